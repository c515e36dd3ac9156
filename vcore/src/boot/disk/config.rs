//! Boot loader configurations, parsed just enough to find the default
//! entry's kernel, initrds and command line: extlinux/syslinux, GRUB 2's
//! `grub.cfg`, and Boot Loader Specification (systemd-boot) entries.

/// Where GRUB is told the files of an entry live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootHint {
    /// `search --fs-uuid --set=root UUID`.
    Uuid(String),
    /// `search --label --set=root LABEL`.
    Label(String),
    /// `set root=(hd0,gpt2)` / `hd0,msdos1`: partition number.
    Part(u32),
}

/// One boot entry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Entry {
    /// Label or title.
    pub title: String,
    /// Kernel path as written.
    pub kernel: String,
    /// Initrd paths as written.
    pub initrds: Vec<String>,
    /// Command line.
    pub options: String,
    /// GRUB's root for this entry.
    pub root: Option<RootHint>,
}

/// A parsed configuration: the default entry, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Entry(Entry),
    /// GRUB `configfile PATH` (with the root in effect) and no entries.
    ConfigFile(String, Option<RootHint>),
    /// GRUB `blscfg`: the entries are BLS files next to grub.cfg.
    Bls(Option<RootHint>),
    /// No usable entry; the reason.
    None(String),
}

/// Split a line into words, honouring quotes (GRUB and shell style).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut q: Option<char> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (q, c) {
            (None, '#') if !have => break,
            (None, c) if c.is_whitespace() => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            (None, '\'' | '"') => {
                q = Some(c);
                have = true;
            }
            (Some(qc), c) if c == qc => q = None,
            (Some('"') | None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                have = true;
            }
            (_, c) => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        out.push(cur);
    }
    out
}

// ---------------------------------------------------------------- extlinux

/// Parse extlinux.conf / syslinux.cfg; picks `DEFAULT`, else `MENU DEFAULT`,
/// else the first `LABEL`.
pub fn extlinux(text: &str) -> Parsed {
    let mut default: Option<String> = None;
    let mut menu_default: Option<usize> = None;
    let mut entries: Vec<Entry> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kw, rest) = match line.split_once(char::is_whitespace) {
            Some((k, r)) => (k.to_ascii_lowercase(), r.trim()),
            None => (line.to_ascii_lowercase(), ""),
        };
        match kw.as_str() {
            "default" => default = Some(rest.to_string()),
            "label" => entries.push(Entry {
                title: rest.to_string(),
                ..Default::default()
            }),
            "menu" => {
                let r = rest.to_ascii_lowercase();
                if r == "default" && !entries.is_empty() {
                    menu_default = Some(entries.len() - 1);
                } else if let Some(l) = r.strip_prefix("label ") {
                    if let Some(e) = entries.last_mut() {
                        if e.title.is_empty() {
                            e.title = l.to_string();
                        }
                    }
                }
            }
            "kernel" | "linux" => {
                if let Some(e) = entries.last_mut() {
                    e.kernel = rest.to_string();
                }
            }
            "initrd" => {
                if let Some(e) = entries.last_mut() {
                    e.initrds = rest.split(',').map(|s| s.trim().to_string()).collect();
                }
            }
            "append" => {
                if let Some(e) = entries.last_mut() {
                    let mut opts = Vec::new();
                    for w in rest.split_whitespace() {
                        match w.strip_prefix("initrd=") {
                            Some(i) => e.initrds.extend(i.split(',').map(str::to_string)),
                            None => opts.push(w),
                        }
                    }
                    e.options = opts.join(" ");
                }
            }
            _ => {}
        }
    }
    let chosen = match &default {
        Some(d) => match entries.iter().position(|e| e.title == *d) {
            Some(i) => Some(entries[i].clone()),
            // Old syslinux: DEFAULT is a kernel with its arguments.
            None if entries.is_empty() => {
                let mut it = d.split_whitespace();
                it.next().map(|k| Entry {
                    title: d.clone(),
                    kernel: k.to_string(),
                    options: it.collect::<Vec<_>>().join(" "),
                    ..Default::default()
                })
            }
            None => {
                return Parsed::None(format!("DEFAULT {d} names no LABEL"));
            }
        },
        None => menu_default
            .or(if entries.is_empty() { None } else { Some(0) })
            .map(|i| entries[i].clone()),
    };
    match chosen {
        Some(e) if !e.kernel.is_empty() => Parsed::Entry(e),
        Some(e) => Parsed::None(format!("entry '{}' has no KERNEL or LINUX line", e.title)),
        None => Parsed::None("no LABEL entries".into()),
    }
}

// -------------------------------------------------------------------- GRUB

fn grub_root(w: &[String]) -> Option<RootHint> {
    // `set root='hd0,gpt2'`, `set root=(hd0,msdos1)`
    let v = w.get(1)?.strip_prefix("root=")?;
    let v = v.trim_matches(|c| c == '(' || c == ')');
    let part = v.split(',').nth(1)?;
    let n: String = part.chars().filter(char::is_ascii_digit).collect();
    n.parse().ok().map(RootHint::Part)
}

fn grub_search(w: &[String]) -> Option<RootHint> {
    // search [--no-floppy] --fs-uuid|--label|-u|-l [--set=root|--set root] VALUE [hints]
    // search.fs_uuid UUID root / search.fs_label LABEL root
    let cmd = w.first()?.as_str();
    if cmd == "search.fs_uuid" {
        return w.get(1).map(|u| RootHint::Uuid(u.clone()));
    }
    if cmd == "search.fs_label" {
        return w.get(1).map(|u| RootHint::Label(u.clone()));
    }
    let mut kind = None;
    let mut set_root = false;
    let mut value = None;
    let mut i = 1;
    while i < w.len() {
        match w[i].as_str() {
            "--fs-uuid" | "-u" => kind = Some(true),
            "--label" | "-l" => kind = Some(false),
            "--set=root" => set_root = true,
            "--set" | "-s" => {
                if w.get(i + 1).map(String::as_str) == Some("root") {
                    i += 1;
                }
                set_root = true;
            }
            s if s.starts_with('-') => {}
            s => {
                if value.is_none() {
                    value = Some(s.to_string());
                }
            }
        }
        i += 1;
    }
    if !set_root {
        return None;
    }
    match (kind?, value?) {
        (true, v) => Some(RootHint::Uuid(v)),
        (false, v) => Some(RootHint::Label(v)),
    }
}

/// Expand `$var`s in a BLS entry's options from a grubenv block (Fedora's
/// `options $kernelopts`, which GRUB's `blscfg` expands).
pub fn expand_grubenv(s: &str, grubenv: &str) -> String {
    if !s.contains('$') {
        return s.to_string();
    }
    let vars: Vec<(String, String)> = grubenv
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    expand(s, &vars)
}

fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(b) = after.strip_prefix('{') {
            match b.find('}') {
                Some(j) => (&b[..j], &b[j + 1..]),
                None => (b, ""),
            }
        } else {
            let j = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..j], &after[j..])
        };
        if let Some((_, v)) = vars.iter().rev().find(|(k, _)| k == name) {
            out.push_str(v);
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

struct GrubEntry {
    entry: Entry,
    id: Option<String>,
}

/// Split GRUB's `(hd0,gpt2)/path` into the partition and the path.
pub fn split_device(path: &str) -> (Option<RootHint>, String) {
    if let Some(rest) = path.strip_prefix('(') {
        if let Some((dev, p)) = rest.split_once(')') {
            let hint = grub_root(&["set".into(), format!("root={dev}")]);
            return (hint, p.to_string());
        }
    }
    (None, path.to_string())
}

/// Parse grub.cfg: the `set default=` entry (index, `N>M`, title or id),
/// else the first; `$var`s from simple `set` lines are expanded.
pub fn grub(text: &str) -> Parsed {
    grub_with_env(text, "")
}

/// [`grub`] with the `grubenv` block next to grub.cfg, whose variables
/// (`saved_entry`, `next_entry`, `kernelopts`) `load_env` would set.
pub fn grub_with_env(text: &str, grubenv: &str) -> Parsed {
    let mut vars: Vec<(String, String)> = vec![("menuentry_id_option".into(), "--id".into())];
    for line in grubenv.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if !k.starts_with('#') && !k.is_empty() {
                vars.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    let mut default: Option<String> = None;
    let mut global_root: Option<RootHint> = None;
    // Top-level items: an entry, or a submenu of entries.
    let mut top: Vec<Vec<GrubEntry>> = Vec::new();
    let mut depth = 0usize; // brace depth
    let mut in_entry: Option<GrubEntry> = None;
    let mut entry_depth = 0usize;
    let mut submenu_depth: Option<usize> = None;
    let mut configfile: Option<(String, Option<RootHint>)> = None;
    let mut blscfg = false;

    for raw in text.lines() {
        let w = words(raw);
        if w.is_empty() {
            continue;
        }
        let w: Vec<String> = w.iter().map(|x| expand(x, &vars)).collect();
        let cmd = w[0].as_str();
        let opens = raw.trim_end().ends_with('{');
        match cmd {
            "menuentry" => {
                let id = w
                    .iter()
                    .position(|x| x == "--id")
                    .and_then(|i| w.get(i + 1).cloned())
                    .or_else(|| {
                        // `$menuentry_id_option 'id'` expands to `--id`.
                        w.windows(2).find(|p| p[0] == "--id").map(|p| p[1].clone())
                    });
                in_entry = Some(GrubEntry {
                    entry: Entry {
                        title: w.get(1).cloned().unwrap_or_default(),
                        root: global_root.clone(),
                        ..Default::default()
                    },
                    id,
                });
                depth += usize::from(opens);
                entry_depth = depth;
                continue;
            }
            "submenu" => {
                top.push(Vec::new());
                depth += usize::from(opens);
                submenu_depth = Some(depth);
                continue;
            }
            "}" => {
                if in_entry.is_some() && depth == entry_depth {
                    if let Some(e) = in_entry.take() {
                        if submenu_depth.is_some() {
                            if let Some(last) = top.last_mut() {
                                last.push(e);
                            }
                        } else {
                            top.push(vec![e]);
                        }
                    }
                } else if submenu_depth == Some(depth) {
                    submenu_depth = None;
                }
                depth = depth.saturating_sub(1);
                continue;
            }
            _ => {}
        }
        if opens {
            depth += 1;
        }
        if let Some(e) = in_entry.as_mut() {
            match cmd {
                "linux" | "linux16" | "linuxefi" | "kernel" => {
                    e.entry.kernel = w.get(1).cloned().unwrap_or_default();
                    e.entry.options = w[2.min(w.len())..].join(" ");
                }
                "initrd" | "initrd16" | "initrdefi" => {
                    e.entry.initrds = w[1..].to_vec();
                }
                "set" => {
                    if let Some(r) = grub_root(&w) {
                        e.entry.root = Some(r);
                    }
                }
                c if c.starts_with("search") => {
                    if let Some(r) = grub_search(&w) {
                        e.entry.root = Some(r);
                    }
                }
                _ => {}
            }
            continue;
        }
        match cmd {
            "set" => {
                if let Some((k, v)) = w.get(1).and_then(|kv| kv.split_once('=')) {
                    if k == "default" {
                        default = Some(v.to_string());
                    }
                    if k == "root" {
                        global_root = grub_root(&w);
                    }
                    vars.push((k.to_string(), v.to_string()));
                }
            }
            "configfile" | "source" => {
                if let Some(p) = w.get(1) {
                    configfile = Some((p.clone(), global_root.clone()));
                }
            }
            "blscfg" => blscfg = true,
            c if c.starts_with("search") => {
                if let Some(r) = grub_search(&w) {
                    global_root = Some(r);
                }
            }
            _ => {}
        }
    }

    if top.is_empty() {
        if blscfg {
            return Parsed::Bls(global_root);
        }
        if let Some((p, r)) = configfile {
            return Parsed::ConfigFile(p, r);
        }
        return Parsed::None("no menuentry".into());
    }
    let flat = |i: usize, j: usize| top.get(i).and_then(|v| v.get(j));
    let chosen: Option<&GrubEntry> = match default.as_deref() {
        None | Some("") | Some("saved") | Some("${saved_entry}") => flat(0, 0),
        Some(d) => {
            let by_index = |s: &str| s.parse::<usize>().ok();
            if let Some((a, b)) = d.split_once('>') {
                match (by_index(a), by_index(b)) {
                    (Some(i), Some(j)) => flat(i, j),
                    _ => top
                        .iter()
                        .flatten()
                        .find(|e| e.entry.title == b || e.id.as_deref() == Some(b)),
                }
            } else if let Some(i) = by_index(d) {
                flat(i, 0)
            } else {
                top.iter()
                    .flatten()
                    .find(|e| e.entry.title == d || e.id.as_deref() == Some(d))
            }
        }
    };
    let Some(e) = chosen.or_else(|| flat(0, 0)) else {
        return Parsed::None(format!(
            "default entry '{}' not found",
            default.unwrap_or_default()
        ));
    };
    if e.entry.kernel.is_empty() {
        return Parsed::None(format!("entry '{}' has no linux line", e.entry.title));
    }
    Parsed::Entry(e.entry.clone())
}

/// Parse GRUB legacy `menu.lst` / `grub.conf`: `default N` (0-based),
/// `title`, `root (hd0,N)` (0-based partition), `kernel PATH ARGS`, `initrd`.
pub fn grub_legacy(text: &str) -> Parsed {
    let mut default = 0usize;
    let mut global_root = None;
    let mut entries: Vec<Entry> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (kw, rest) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some((k, r)) => (k, r.trim()),
            None => (line, ""),
        };
        match kw {
            "default" => default = rest.parse().unwrap_or(0),
            "title" => entries.push(Entry {
                title: rest.to_string(),
                root: global_root.clone(),
                ..Default::default()
            }),
            "root" => {
                let part = rest
                    .trim_matches(|c| c == '(' || c == ')')
                    .split(',')
                    .nth(1)
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .map(|n| RootHint::Part(n + 1));
                match entries.last_mut() {
                    Some(e) => e.root = part,
                    None => global_root = part,
                }
            }
            "kernel" => {
                if let Some(e) = entries.last_mut() {
                    let mut it = rest.split_whitespace();
                    e.kernel = it.next().unwrap_or("").to_string();
                    e.options = it.collect::<Vec<_>>().join(" ");
                }
            }
            "initrd" => {
                if let Some(e) = entries.last_mut() {
                    e.initrds = rest
                        .split_whitespace()
                        .take(1)
                        .map(str::to_string)
                        .collect();
                }
            }
            _ => {}
        }
    }
    match entries.get(default).or(entries.first()) {
        Some(e) if !e.kernel.is_empty() => Parsed::Entry(e.clone()),
        Some(e) => Parsed::None(format!("entry '{}' has no kernel line", e.title)),
        None => Parsed::None("no title entries".into()),
    }
}

// --------------------------------------------------------------------- BLS

/// One BLS entry file.
#[derive(Clone, Debug, Default)]
pub struct BlsEntry {
    pub file: String,
    pub version: String,
    pub sort_key: String,
    pub entry: Entry,
}

/// Parse a `loader/entries/*.conf` file.
pub fn bls_entry(file: &str, text: &str) -> BlsEntry {
    let mut b = BlsEntry {
        file: file.to_string(),
        ..Default::default()
    };
    let mut options = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let v = v.trim().to_string();
        match k {
            "title" => b.entry.title = v,
            "version" => b.version = v,
            "sort-key" => b.sort_key = v,
            "linux" => b.entry.kernel = v,
            "initrd" => b.entry.initrds.push(v),
            "options" => options.push(v),
            _ => {}
        }
    }
    b.entry.options = options.join(" ");
    if b.entry.title.is_empty() {
        b.entry.title = file.trim_end_matches(".conf").to_string();
    }
    b
}

/// Compare versions like `systemd-boot`/`sort -V`: digit runs numerically.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let da = std::str::from_utf8(&a[..na])
                    .unwrap_or("0")
                    .trim_start_matches('0');
                let db = std::str::from_utf8(&b[..nb])
                    .unwrap_or("0")
                    .trim_start_matches('0');
                let o = da.len().cmp(&db.len()).then(da.cmp(db));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn glob(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((pre, rest)) => {
            if !s.starts_with(pre) {
                return false;
            }
            let s = &s[pre.len()..];
            (0..=s.len()).any(|i| s.is_char_boundary(i) && glob(rest, &s[i..]))
        }
    }
}

/// Pick the default BLS entry: `loader.conf`'s `default` pattern when it
/// matches, else the first in systemd-boot's order (sort-key, then the
/// newest version, then file name descending).
pub fn bls_default(mut entries: Vec<BlsEntry>, loader_conf: Option<&str>) -> Option<BlsEntry> {
    entries.sort_by(|x, y| {
        let xk = x.sort_key.is_empty();
        let yk = y.sort_key.is_empty();
        xk.cmp(&yk)
            .then(x.sort_key.cmp(&y.sort_key))
            .then(version_cmp(&y.version, &x.version))
            .then(version_cmp(&y.file, &x.file))
    });
    if let Some(conf) = loader_conf {
        for line in conf.lines() {
            let mut it = line.split_whitespace();
            if it.next() == Some("default") {
                if let Some(p) = it.next() {
                    if let Some(e) = entries
                        .iter()
                        .find(|e| glob(p, &e.file) || glob(p, e.file.trim_end_matches(".conf")))
                    {
                        return Some(e.clone());
                    }
                }
            }
        }
    }
    entries.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extlinux_default_label() {
        let t = "UI menu.c32\nDEFAULT two\nLABEL one\n  KERNEL /a\nLABEL two\n  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND root=/dev/vda1 ro\n";
        let Parsed::Entry(e) = extlinux(t) else {
            panic!()
        };
        assert_eq!(e.kernel, "/boot/vmlinuz");
        assert_eq!(e.initrds, ["/boot/initrd.img"]);
        assert_eq!(e.options, "root=/dev/vda1 ro");
        let t = "label a\nkernel k\nappend initrd=i1,i2 x=1\n";
        let Parsed::Entry(e) = extlinux(t) else {
            panic!()
        };
        assert_eq!(e.initrds, ["i1", "i2"]);
        assert_eq!(e.options, "x=1");
        assert!(matches!(
            extlinux("DEFAULT x\nLABEL y\nKERNEL k\n"),
            Parsed::None(_)
        ));
    }

    #[test]
    fn grub_default_and_submenu() {
        let t = r#"
set default="2>1"
set timeout=5
insmod ext2
search --no-floppy --fs-uuid --set=root 1111-2222
menuentry 'Debian' --class debian $menuentry_id_option 'gnulinux-simple' {
	linux	/boot/vmlinuz-6.1 root=UUID=abc ro quiet
	initrd	/boot/initrd.img-6.1
}
menuentry "Other" {
	set root='hd0,gpt3'
	linux /vmlinuz-x a=b
}
submenu 'Advanced' {
	menuentry 'old' {
		linux /boot/vmlinuz-5 o=1
	}
	menuentry 'older' {
		linux /boot/vmlinuz-4 "o=2 x"
		initrd /boot/i4 /boot/ucode
	}
}
"#;
        let Parsed::Entry(e) = grub(t) else { panic!() };
        assert_eq!(e.kernel, "/boot/vmlinuz-4");
        assert_eq!(e.options, "o=2 x");
        assert_eq!(e.initrds, ["/boot/i4", "/boot/ucode"]);
        assert_eq!(e.root, Some(RootHint::Uuid("1111-2222".into())));
        let t2 = t.replace("2>1", "1");
        let Parsed::Entry(e) = grub(&t2) else {
            panic!()
        };
        assert_eq!(e.root, Some(RootHint::Part(3)));
        let t3 = t.replace("2>1", "Debian");
        let Parsed::Entry(e) = grub(&t3) else {
            panic!()
        };
        assert_eq!(e.options, "root=UUID=abc ro quiet");
        let t4 = t.replace("set default=\"2>1\"", "set default=\"gnulinux-simple\"");
        let Parsed::Entry(e) = grub(&t4) else {
            panic!()
        };
        assert_eq!(e.kernel, "/boot/vmlinuz-6.1");
        let cf = "search.fs_uuid 0a-1b root hd0,gpt2\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n";
        assert_eq!(
            grub(cf),
            Parsed::ConfigFile(
                "()/boot/grub/grub.cfg".into(),
                Some(RootHint::Uuid("0a-1b".into()))
            )
        );
    }

    #[test]
    fn grub_legacy_menu_lst() {
        let t = "default=1\ntimeout 5\ntitle A\nroot (hd0,0)\nkernel /boot/a ro\ntitle B\n\troot (hd0,1)\n\tkernel /vmlinuz-3.2 root=/dev/sda2 ro quiet\n\tinitrd /initrd.img-3.2\n";
        let Parsed::Entry(e) = grub_legacy(t) else {
            panic!()
        };
        assert_eq!(e.title, "B");
        assert_eq!(e.kernel, "/vmlinuz-3.2");
        assert_eq!(e.options, "root=/dev/sda2 ro quiet");
        assert_eq!(e.initrds, ["/initrd.img-3.2"]);
        assert_eq!(e.root, Some(RootHint::Part(2)));
    }

    #[test]
    fn grub_saved_entry_from_grubenv() {
        let t = "if [ -s $prefix/grubenv ]; then\n  load_env\nfi\nif [ \"${next_entry}\" ] ; then\n   set default=\"${next_entry}\"\nelse\n   set default=\"${saved_entry}\"\nfi\nmenuentry 'A' --id a {\n linux /a\n}\nmenuentry 'B' --id b {\n linux /b $kernelopts\n}\n";
        let env = "# GRUB Environment Block\nsaved_entry=b\nkernelopts=root=/dev/vda2 ro\n#####\n";
        let Parsed::Entry(e) = grub_with_env(t, env) else {
            panic!()
        };
        assert_eq!(e.kernel, "/b");
        assert_eq!(e.options, "root=/dev/vda2 ro");
        let Parsed::Entry(e) = grub(t) else { panic!() };
        assert_eq!(e.kernel, "/a");
        assert_eq!(
            expand_grubenv("$kernelopts quiet", env),
            "root=/dev/vda2 ro quiet"
        );
    }

    #[test]
    fn bls_order_and_default() {
        let a = bls_entry("a-6.1.conf", "title A\nversion 6.1.0\nlinux /vmlinuz-6.1\noptions x\noptions y\ninitrd /i1\ninitrd /i2\n");
        let b = bls_entry(
            "a-6.10.conf",
            "title B\nversion 6.10.0\nlinux /vmlinuz-6.10\n",
        );
        let d = bls_default(vec![a.clone(), b.clone()], None).unwrap();
        assert_eq!(d.entry.title, "B");
        assert_eq!(a.entry.options, "x y");
        assert_eq!(a.entry.initrds, ["/i1", "/i2"]);
        let d = bls_default(vec![a, b], Some("timeout 3\ndefault a-6.1.conf\n")).unwrap();
        assert_eq!(d.entry.title, "A");
        assert_eq!(version_cmp("6.10", "6.9"), std::cmp::Ordering::Greater);
    }
}
