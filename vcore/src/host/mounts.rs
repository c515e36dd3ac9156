//! The mount table from `<root>/proc/mounts`.

use std::io;
use std::path::{Path, PathBuf};

/// One line of /proc/mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// What is mounted (`hugetlbfs`, `/dev/sda1`, `none`).
    pub source: String,
    /// Where it is mounted, with the kernel's octal escapes (`\040`) undone.
    pub target: PathBuf,
    /// File system type (`hugetlbfs`, `ext4`).
    pub fstype: String,
    /// Mount options in kernel order (`rw`, `relatime`, `pagesize=2M`).
    pub options: Vec<String>,
}

impl Mount {
    /// The value of option `name=` if present (`option("pagesize")` → `"2M"`).
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
    }

    /// The options joined with commas, as `mount` prints them.
    pub fn options_string(&self) -> String {
        self.options.join(",")
    }
}

/// Undo the kernel's octal escapes in /proc/mounts fields (`\040` = space,
/// `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64
                    + (oct[1] - b'0') as u32 * 8
                    + (oct[2] - b'0') as u32;
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of /proc/mounts. Malformed lines are skipped.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let source = unescape(f.next()?);
            let target = PathBuf::from(unescape(f.next()?));
            let fstype = unescape(f.next()?);
            let options = f
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|o| !o.is_empty())
                .map(unescape)
                .collect();
            Some(Mount {
                source,
                target,
                fstype,
                options,
            })
        })
        .collect()
}

/// Every mount in `<root>/proc/mounts`, in mount order.
pub fn mounts(root: &Path) -> io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string(root.join("proc/mounts"))?;
    Ok(parse_mounts(&text))
}

/// The last (topmost) mount whose target is exactly `dir`.
pub fn mount_at<'a>(mounts: &'a [Mount], dir: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.target == dir)
}

/// True when `path` is `dir` or lies under it (component-wise, so
/// `/dev/hugepages2` is not under `/dev/hugepages`).
pub fn is_under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
none /mnt/huge\\0401g hugetlbfs rw,relatime,pagesize=1024M,size=4294967296,min_size=1073741824 0 0
/dev/vda1 / ext4 rw,relatime 0 0
";

    #[test]
    fn parses_and_unescapes() {
        let m = parse_mounts(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].target, PathBuf::from("/dev/hugepages"));
        assert_eq!(m[1].option("pagesize"), Some("2M"));
        assert_eq!(m[2].target, PathBuf::from("/mnt/huge 1g"));
        assert_eq!(m[2].option("size"), Some("4294967296"));
        assert_eq!(m[2].option("min_size"), Some("1073741824"));
        assert_eq!(m[2].option("mode"), None);
        assert_eq!(m[3].options_string(), "rw,relatime");
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
        assert_eq!(unescape("trail\\04"), "trail\\04");
        assert!(mount_at(&m, Path::new("/dev/hugepages")).is_some());
        assert!(is_under(
            Path::new("/dev/hugepages/x"),
            Path::new("/dev/hugepages")
        ));
        assert!(!is_under(
            Path::new("/dev/hugepages2"),
            Path::new("/dev/hugepages")
        ));
    }
}
