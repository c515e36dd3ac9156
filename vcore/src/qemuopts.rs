//! QEMU's option syntax: `value,key=value,flag` lists, and the options
//! whose parsing several tools share (`-smp`).

use crate::cpuid::Topology;

/// Parse a QEMU option list `key=value,flag,noflag,...` as QemuOpts does:
/// a name runs to the first `=` or `,` (no escapes in names); a value runs
/// to the first single `,` (`,,` is a literal comma); a bare `name` is
/// `name=on` and a bare `noname` is `name=off`.
pub fn pairs(s: &str) -> Vec<(String, String)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut p = 0;
    while p < b.len() {
        let len = b[p..]
            .iter()
            .position(|&c| c == b'=' || c == b',')
            .unwrap_or(b.len() - p);
        let name = String::from_utf8_lossy(&b[p..p + len]).into_owned();
        p += len;
        if b.get(p) == Some(&b'=') {
            let (v, next) = value(b, p + 1);
            out.push((name, v));
            p = next;
        } else {
            match name.strip_prefix("no") {
                Some(n) => out.push((n.to_string(), "off".to_string())),
                None => out.push((name, "on".to_string())),
            }
            if b.get(p) == Some(&b',') {
                p += 1;
            }
        }
    }
    out
}

/// The value starting at `p` (to the first single comma, `,,` unescaped)
/// and where the next element starts.
fn value(b: &[u8], mut p: usize) -> (String, usize) {
    let mut v = Vec::new();
    while p < b.len() {
        if b[p] == b',' {
            if b.get(p + 1) == Some(&b',') {
                v.push(b',');
                p += 2;
                continue;
            }
            return (String::from_utf8_lossy(&v).into_owned(), p + 1);
        }
        v.push(b[p]);
        p += 1;
    }
    (String::from_utf8_lossy(&v).into_owned(), p)
}

/// Split `first,key=value,...` (`-netdev tap,id=n0`, `-chardev
/// unix:PATH,server`) into the leading value of QEMU's implied option,
/// present when the first element has no `=`, and the [`pairs`] of the
/// rest.
pub fn split(s: &str) -> (Option<String>, Vec<(String, String)>) {
    let b = s.as_bytes();
    match b.iter().position(|&c| c == b'=' || c == b',') {
        Some(i) if b[i] == b'=' => (None, pairs(s)),
        _ => {
            let (first, next) = value(b, 0);
            (Some(first), pairs(&s[next..]))
        }
    }
}

/// Parse `-smp N[,cpus=N][,sockets=S][,cores=C][,threads=T][,maxcpus=M]`
/// as QEMU 6.2+ does: missing values are filled preferring cores, and the
/// product must equal the CPU count. `max` is the host's vCPU limit.
pub fn parse_smp(s: &str, max: u32) -> Result<Topology, String> {
    let (first, kv) = split(s);
    let num = |k: &str, v: &str| -> Result<u32, String> {
        v.parse::<u32>()
            .map_err(|_| format!("-smp: parameter '{k}' expects a number, not '{v}'"))
    };
    let mut cpus = match &first {
        Some(f) if !f.is_empty() => Some(num("cpus", f)?),
        _ => None,
    };
    let (mut sockets, mut cores, mut threads, mut maxcpus) = (None, None, None, None);
    for (k, v) in &kv {
        match k.as_str() {
            "cpus" => cpus = Some(num(k, v)?),
            "sockets" => sockets = Some(num(k, v)?),
            "cores" => cores = Some(num(k, v)?),
            "threads" => threads = Some(num(k, v)?),
            "maxcpus" => maxcpus = Some(num(k, v)?),
            "dies" | "clusters" => {
                if num(k, v)? != 1 {
                    return Err(format!("-smp: {k}={v} is not supported (only 1)"));
                }
            }
            other => return Err(format!("-smp: invalid parameter '{other}'")),
        }
    }
    for (k, v) in [
        ("cpus", cpus),
        ("sockets", sockets),
        ("cores", cores),
        ("threads", threads),
        ("maxcpus", maxcpus),
    ] {
        if v == Some(0) {
            return Err(format!("-smp: {k} must be greater than 0"));
        }
    }
    let threads = threads.unwrap_or(1);
    let n = cpus.or(maxcpus);
    let (sockets, cores) = match (sockets, cores, n) {
        (Some(s), Some(c), _) => (s, c),
        (Some(s), None, Some(n)) => (s, (n / (s * threads)).max(1)),
        (Some(s), None, None) => (s, 1),
        (None, Some(c), Some(n)) => ((n / (c * threads)).max(1), c),
        (None, Some(c), None) => (1, c),
        (None, None, Some(n)) => (1, (n / threads).max(1)),
        (None, None, None) => (1, 1),
    };
    let product = sockets * cores * threads;
    let n = n.unwrap_or(product);
    if let Some(m) = maxcpus {
        if m != n {
            return Err(format!(
                "-smp: maxcpus={m} differs from cpus={n}; CPU hotplug is not supported"
            ));
        }
    }
    if product != n {
        return Err(format!(
            "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets ({sockets}) * cores ({cores}) * threads ({threads}) != maxcpus ({n})"
        ));
    }
    if n > max {
        return Err(format!(
            "Invalid SMP CPUs {n}. The max CPUs supported by this host's KVM is {max}"
        ));
    }
    Ok(Topology {
        sockets,
        cores,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u32, c: u32, th: u32) -> Topology {
        Topology {
            sockets: s,
            cores: c,
            threads: th,
        }
    }

    #[test]
    fn smp_forms() {
        assert_eq!(parse_smp("1", 64), Ok(t(1, 1, 1)));
        assert_eq!(parse_smp("4", 64), Ok(t(1, 4, 1)));
        assert_eq!(parse_smp("4,threads=2", 64), Ok(t(1, 2, 2)));
        assert_eq!(parse_smp("8,sockets=2", 64), Ok(t(2, 4, 1)));
        assert_eq!(parse_smp("sockets=2,cores=2,threads=2", 64), Ok(t(2, 2, 2)));
        assert_eq!(parse_smp("cpus=2,cores=2", 64), Ok(t(1, 2, 1)));
    }

    #[test]
    fn smp_errors() {
        assert!(parse_smp("4,sockets=3", 64)
            .unwrap_err()
            .contains("sockets (3) * cores (1) * threads (1) != maxcpus (4)"));
        assert_eq!(
            parse_smp("x", 64).unwrap_err(),
            "-smp: parameter 'cpus' expects a number, not 'x'"
        );
        assert_eq!(
            parse_smp("0", 64).unwrap_err(),
            "-smp: cpus must be greater than 0"
        );
        assert!(parse_smp("300", 255)
            .unwrap_err()
            .contains("max CPUs supported by this host's KVM is 255"));
        assert_eq!(
            parse_smp("2,bogus=1", 64).unwrap_err(),
            "-smp: invalid parameter 'bogus'"
        );
    }

    #[test]
    fn split_lists() {
        let (f, kv) = split("file=a,,b.img,if=virtio,readonly");
        assert_eq!(f, None);
        assert_eq!(
            kv,
            vec![
                ("file".into(), "a,b.img".into()),
                ("if".into(), "virtio".into()),
                ("readonly".into(), "on".into())
            ]
        );
        assert_eq!(
            split("unix:/tmp/s,server,nowait"),
            (
                Some("unix:/tmp/s".into()),
                vec![
                    ("server".into(), "on".into()),
                    ("wait".into(), "off".into())
                ]
            )
        );
        assert_eq!(split("a,,b,x=1").0.as_deref(), Some("a,b"));
        assert_eq!(split("tap").0.as_deref(), Some("tap"));
        assert_eq!(split(""), (Some(String::new()), vec![]));
        assert_eq!(
            pairs("a=,,x,,,b=c=d,,e,flag,noflag2,"),
            vec![
                ("a".into(), ",x,".into()),
                ("b".into(), "c=d,e".into()),
                ("flag".into(), "on".into()),
                ("flag2".into(), "off".into())
            ]
        );
    }
}
