//! QEMU-compatible JSON and "human" dumps of QAPI objects.
//!
//! qemu-img builds its output as a QDict: a 512-bucket hash table keyed by
//! `tdb_hash`, iterated bucket by bucket, newest entry first within a
//! bucket. To print keys in the same order we keep insertion order and sort
//! by bucket at print time.

/// A JSON value; object members in insertion order (QAPI field order).
#[derive(Clone, Debug, PartialEq)]
pub enum J {
    /// Object.
    Obj(Vec<(String, J)>),
    /// Array.
    Arr(Vec<J>),
    /// String.
    Str(String),
    /// Signed integer.
    Int(i64),
    /// Unsigned integer.
    UInt(u64),
    /// Boolean.
    Bool(bool),
}

impl J {
    /// Empty object.
    pub fn obj() -> J {
        J::Obj(Vec::new())
    }
    /// Append a member (objects only).
    pub fn set(&mut self, k: &str, v: J) {
        if let J::Obj(m) = self {
            m.push((k.to_string(), v));
        }
    }
    /// Builder-style `set`.
    pub fn with(mut self, k: &str, v: J) -> J {
        self.set(k, v);
        self
    }
    /// String value.
    pub fn s(v: impl Into<String>) -> J {
        J::Str(v.into())
    }
}

/// QEMU's `tdb_hash` (qobject/qdict.c).
pub fn tdb_hash(name: &str) -> u32 {
    let b = name.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        value = value.wrapping_add((c as u32) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// Members in QDict iteration order.
pub fn qdict_order(m: &[(String, J)]) -> Vec<&(String, J)> {
    let mut v: Vec<(usize, u32, &(String, J))> = m
        .iter()
        .enumerate()
        .map(|(i, e)| (i, tdb_hash(&e.0) % 512, e))
        .collect();
    // Bucket ascending; within a bucket the last inserted comes first.
    v.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
    v.into_iter().map(|x| x.2).collect()
}

fn esc(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn pretty_into(j: &J, level: usize, out: &mut String) {
    let ind = |n: usize| " ".repeat(n * 4);
    match j {
        J::Obj(m) => {
            out.push('{');
            for (i, (k, v)) in qdict_order(m).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&ind(level + 1));
                esc(k, out);
                out.push_str(": ");
                pretty_into(v, level + 1, out);
            }
            out.push('\n');
            out.push_str(&ind(level));
            out.push('}');
        }
        J::Arr(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&ind(level + 1));
                pretty_into(v, level + 1, out);
            }
            out.push('\n');
            out.push_str(&ind(level));
            out.push(']');
        }
        J::Str(s) => esc(s, out),
        J::Int(i) => out.push_str(&i.to_string()),
        J::UInt(u) => out.push_str(&u.to_string()),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
    }
}

/// QEMU's `qobject_to_json_pretty` (without the trailing newline).
pub fn pretty(j: &J) -> String {
    let mut s = String::new();
    pretty_into(j, 0, &mut s);
    s
}

/// QEMU's human `dump_qdict` (block/qapi.c): keys with dashes turned into
/// spaces, nested objects and lists indented by 4.
pub fn dump_human(j: &J, indent: usize, out: &mut String) {
    match j {
        J::Obj(m) => {
            for (k, v) in qdict_order(m) {
                let key = k.replace('-', " ");
                let composite = matches!(v, J::Obj(_) | J::Arr(_));
                out.push_str(&format!("{:w$}{key}:", "", w = indent * 4));
                out.push(if composite { '\n' } else { ' ' });
                dump_human(v, indent + 1, out);
            }
        }
        J::Arr(a) => {
            for (i, v) in a.iter().enumerate() {
                let composite = matches!(v, J::Obj(_) | J::Arr(_));
                out.push_str(&format!("{:w$}[{i}]:", "", w = indent * 4));
                out.push(if composite { '\n' } else { ' ' });
                dump_human(v, indent + 1, out);
            }
        }
        J::Str(s) => {
            out.push_str(s);
            out.push('\n');
        }
        J::Int(i) => out.push_str(&format!("{i}\n")),
        J::UInt(u) => out.push_str(&format!("{u}\n")),
        J::Bool(b) => out.push_str(if *b { "true\n" } else { "false\n" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_keys_in_qemu_order() {
        let mut o = J::obj();
        for k in [
            "filename",
            "format",
            "check-errors",
            "image-end-offset",
            "corruptions",
            "leaks",
            "corruptions-fixed",
            "leaks-fixed",
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "compressed-clusters",
        ] {
            o.set(k, J::Int(0));
        }
        let keys: Vec<&str> = match &o {
            J::Obj(m) => qdict_order(m).iter().map(|e| e.0.as_str()).collect(),
            _ => vec![],
        };
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "corruptions",
                "corruptions-fixed",
                "check-errors",
                "leaks",
                "leaks-fixed",
                "allocated-clusters",
                "filename",
                "format",
                "fragmented-clusters"
            ]
        );
    }
}
