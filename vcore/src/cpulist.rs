//! CPU lists and masks in util-linux syntax (`lib/cpuset.c`, used by
//! taskset, lscpu, chcpu).
//!
//! Parsing follows util-linux's `cpulist_parse` and `cpumask_parse`:
//!
//! * a list is comma-separated items `N`, `A-B` or `A-B:S` (stride `S` ≥ 1,
//!   `A` ≤ `B`); numbers are plain decimal digits; empty items, a trailing
//!   comma, whitespace, signs and trailing junk are rejected, as util-linux
//!   2.39+ does (2.38's `sscanf` was lax about a space before a comma);
//! * a mask is hexadecimal with or without a lowercase `0x` prefix; commas
//!   between groups are skipped, so sysfs masks like `00000000,00000003`
//!   parse; an empty mask is the empty set (taskset then fails to set it).
//!
//! Rejected input gives util-linux's own message, `failed to parse CPU list:
//! INPUT` or `failed to parse CPU mask: INPUT`; [`CpuListError::reason`] says
//! what was wrong. One deliberate difference: CPU numbers of [`MAX_CPUS`] or
//! more are rejected, where taskset silently drops CPUs beyond the kernel's
//! mask size.
//!
//! Formatting has two styles. [`CpuSet::to_list`] prints what `taskset -pc`
//! prints up to util-linux 2.41 (Debian 12 ships 2.38): runs of three or more
//! CPUs as `A-B`, a run of two as `A,B` (`0,1`, not `0-1`). util-linux 2.42
//! added strides; [`CpuSet::to_list_strided`] prints that form (`0-14:2`).
//! [`CpuSet::to_mask`] prints taskset's hexadecimal mask without `0x`.
//!
//! ```
//! use vcore::cpulist::CpuSet;
//! let set = CpuSet::parse_list("0-14:2").unwrap();
//! assert_eq!(set.to_mask(), "5555");
//! assert_eq!(set.to_list(), "0,2,4,6,8,10,12,14");
//! assert_eq!(set.to_list_strided(), "0-14:2");
//! assert_eq!(CpuSet::parse_mask("00000000,00000003").unwrap().to_list(), "0,1");
//! ```

use std::fmt;
use std::str::FromStr;

/// CPU numbers must be below this (Linux's largest `CONFIG_NR_CPUS`).
pub const MAX_CPUS: u32 = 8192;

/// A set of CPU numbers, stored as a bitmap of 64-bit words (the layout the
/// kernel's `sched_setaffinity` expects on 64-bit hosts).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet {
    words: Vec<u64>,
}

/// A CPU list or mask that util-linux would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// A CPU list (`0-3,8`) did not parse.
    #[error("failed to parse CPU list: {input}")]
    List {
        /// The text as given.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A hexadecimal CPU mask (`0x3`, `00000000,00000003`) did not parse.
    #[error("failed to parse CPU mask: {input}")]
    Mask {
        /// The text as given.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl CpuListError {
    /// Why the input was rejected (for example `empty item`).
    pub fn reason(&self) -> &str {
        match self {
            CpuListError::List { reason, .. } | CpuListError::Mask { reason, .. } => reason,
        }
    }

    /// The rejected text.
    pub fn input(&self) -> &str {
        match self {
            CpuListError::List { input, .. } | CpuListError::Mask { input, .. } => input,
        }
    }
}

impl CpuSet {
    /// The empty set.
    pub fn new() -> CpuSet {
        CpuSet::default()
    }

    /// A set from CPU numbers. Numbers of [`MAX_CPUS`] or more are ignored.
    pub fn from_cpus<I: IntoIterator<Item = u32>>(cpus: I) -> CpuSet {
        let mut set = CpuSet::new();
        for cpu in cpus {
            set.insert(cpu);
        }
        set
    }

    /// The set of CPUs whose bits are set in `words` (word 0 holds CPUs 0-63).
    pub fn from_words(words: &[u64]) -> CpuSet {
        let mut set = CpuSet {
            words: words.to_vec(),
        };
        set.trim();
        set
    }

    /// The bitmap, word 0 holding CPUs 0-63; no trailing zero words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    fn trim(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
    }

    /// Adds a CPU; returns false (and does nothing) for numbers of
    /// [`MAX_CPUS`] or more.
    pub fn insert(&mut self, cpu: u32) -> bool {
        if cpu >= MAX_CPUS {
            return false;
        }
        let word = (cpu / 64) as usize;
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (cpu % 64);
        true
    }

    /// Removes a CPU.
    pub fn remove(&mut self, cpu: u32) {
        let word = (cpu / 64) as usize;
        if let Some(w) = self.words.get_mut(word) {
            *w &= !(1 << (cpu % 64));
        }
        self.trim();
    }

    /// Whether the CPU is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        self.words
            .get((cpu / 64) as usize)
            .is_some_and(|w| w & (1 << (cpu % 64)) != 0)
    }

    /// Number of CPUs in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64u32)
                .filter(move |b| w & (1u64 << b) != 0)
                .map(move |b| i as u32 * 64 + b)
        })
    }

    /// The highest CPU in the set.
    pub fn last(&self) -> Option<u32> {
        self.iter().last()
    }

    /// CPUs in either set.
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let n = self.words.len().max(other.words.len());
        let words: Vec<u64> = (0..n)
            .map(|i| self.words.get(i).unwrap_or(&0) | other.words.get(i).unwrap_or(&0))
            .collect();
        CpuSet::from_words(&words)
    }

    /// CPUs in both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        let words: Vec<u64> = self
            .words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| a & b)
            .collect();
        CpuSet::from_words(&words)
    }

    /// CPUs in `self` but not in `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        let words: Vec<u64> = self
            .words
            .iter()
            .enumerate()
            .map(|(i, a)| a & !other.words.get(i).unwrap_or(&0))
            .collect();
        CpuSet::from_words(&words)
    }

    /// Whether every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.difference(other).is_empty()
    }

    /// Parses a CPU list (`0-3,8`, `0-14:2`) like util-linux `cpulist_parse`.
    pub fn parse_list(input: &str) -> Result<CpuSet, CpuListError> {
        let fail = |reason: String| CpuListError::List {
            input: input.to_string(),
            reason,
        };
        // Name the item only when the list has several.
        let within = |r: String, item: &str| {
            if item == input {
                r
            } else {
                format!("{r} in \"{item}\"")
            }
        };
        let mut set = CpuSet::new();
        if input.is_empty() {
            return Err(fail("the list is empty".into()));
        }
        for item in input.split(',') {
            if item.is_empty() {
                return Err(fail("empty item".into()));
            }
            let (a, rest) = leading_number(item).map_err(|r| fail(within(r, item)))?;
            let (b, s) = if rest.is_empty() {
                (a, 1)
            } else if let Some(range_end) = rest.strip_prefix('-') {
                let (b, rest) = leading_number(range_end).map_err(|r| fail(within(r, item)))?;
                if rest.is_empty() {
                    (b, 1)
                } else if let Some(stride) = rest.strip_prefix(':') {
                    let (s, rest) = leading_number(stride).map_err(|r| fail(within(r, item)))?;
                    if !rest.is_empty() {
                        return Err(fail(within(format!("unexpected \"{rest}\""), item)));
                    }
                    if s == 0 {
                        return Err(fail(within("stride 0".into(), item)));
                    }
                    (b, s)
                } else {
                    return Err(fail(within(format!("unexpected \"{rest}\""), item)));
                }
            } else {
                return Err(fail(within(format!("unexpected \"{rest}\""), item)));
            };
            if a > b {
                return Err(fail(format!("range {a}-{b} ends before it starts")));
            }
            if b >= MAX_CPUS as u64 {
                return Err(fail(format!(
                    "CPU {b} is out of range (CPU numbers go up to {})",
                    MAX_CPUS - 1
                )));
            }
            let mut cpu = a;
            while cpu <= b {
                set.insert(cpu as u32);
                cpu += s;
            }
        }
        Ok(set)
    }

    /// Parses a hexadecimal mask (`0x3`, `3`, `00000000,00000003`) like
    /// util-linux `cpumask_parse`.
    pub fn parse_mask(input: &str) -> Result<CpuSet, CpuListError> {
        let fail = |reason: String| CpuListError::Mask {
            input: input.to_string(),
            reason,
        };
        let body = input.strip_prefix("0x").unwrap_or(input);
        let mut set = CpuSet::new();
        let mut cpu: u32 = 0;
        let bytes = body.as_bytes();
        let mut i = bytes.len();
        while i > 0 {
            i -= 1;
            if bytes[i] == b',' {
                // sysfs separates 32-bit groups with commas; util-linux skips
                // one comma, then requires a digit.
                if i == 0 {
                    return Err(fail("a comma without a digit before it".into()));
                }
                i -= 1;
            }
            let c = bytes[i] as char;
            let Some(val) = c.to_digit(16) else {
                return Err(fail(format!("\"{c}\" is not a hexadecimal digit")));
            };
            for bit in 0..4 {
                if val & (1 << bit) != 0 {
                    if cpu + bit >= MAX_CPUS {
                        return Err(fail(format!(
                            "CPU {} is out of range (CPU numbers go up to {})",
                            cpu + bit,
                            MAX_CPUS - 1
                        )));
                    }
                    set.insert(cpu + bit);
                }
            }
            cpu = cpu.saturating_add(4);
        }
        Ok(set)
    }

    /// The list as taskset prints it up to util-linux 2.41 (`0,1`, `0-2,4`).
    pub fn to_list(&self) -> String {
        let cpus: Vec<u32> = self.iter().collect();
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < cpus.len() {
            let mut j = i;
            while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
                j += 1;
            }
            match j - i {
                0 => out.push(cpus[i].to_string()),
                1 => {
                    out.push(cpus[i].to_string());
                    out.push(cpus[j].to_string());
                }
                _ => out.push(format!("{}-{}", cpus[i], cpus[j])),
            }
            i = j + 1;
        }
        out.join(",")
    }

    /// The list as util-linux 2.42+ prints it, with strides (`0-14:2`).
    pub fn to_list_strided(&self) -> String {
        let cpus: Vec<u32> = self.iter().collect();
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < cpus.len() {
            let a = cpus[i];
            if i + 1 == cpus.len() {
                out.push(a.to_string());
                break;
            }
            let s = cpus[i + 1] - a;
            let mut j = i + 1;
            while j + 1 < cpus.len() && cpus[j + 1] - cpus[j] == s {
                j += 1;
            }
            if j == i + 1 {
                // Only two CPUs with this stride: print one, and let the next
                // start a range of its own.
                out.push(a.to_string());
                i += 1;
            } else {
                let b = cpus[j];
                if s == 1 {
                    out.push(format!("{a}-{b}"));
                } else {
                    out.push(format!("{a}-{b}:{s}"));
                }
                i = j + 1;
            }
        }
        out.join(",")
    }

    /// The mask as taskset prints it: hexadecimal, no `0x`, no leading
    /// zeros; `0` for the empty set.
    pub fn to_mask(&self) -> String {
        let mut out = String::new();
        for w in self.words.iter().rev() {
            if out.is_empty() {
                if *w != 0 {
                    out = format!("{w:x}");
                }
            } else {
                out.push_str(&format!("{w:016x}"));
            }
        }
        if out.is_empty() {
            out.push('0');
        }
        out
    }
}

/// Splits a leading decimal number off `s` (digits only, like util-linux's
/// `nextnumber`, which requires `isdigit` first).
fn leading_number(s: &str) -> Result<(u64, &str), String> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return Err(match s.chars().next() {
            Some(c) => format!("expected a number at \"{c}\""),
            None => "missing number".to_string(),
        });
    }
    let digits = &s[..end];
    let n = digits
        .parse::<u64>()
        .ok()
        .filter(|&n| n < MAX_CPUS as u64)
        .ok_or_else(|| {
            format!(
                "CPU {digits} is out of range (CPU numbers go up to {})",
                MAX_CPUS - 1
            )
        })?;
    Ok((n, &s[end..]))
}

impl fmt::Display for CpuSet {
    /// Formats like [`CpuSet::to_list`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_list())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({})", self.to_list())
    }
}

impl FromStr for CpuSet {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<CpuSet, CpuListError> {
        CpuSet::parse_list(s)
    }
}

impl serde::Serialize for CpuSet {
    /// Serialises as a CPU list string (`"0,1"`).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_list())
    }
}

impl<'de> serde::Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CpuSet, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(CpuSet::new());
        }
        CpuSet::parse_list(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// util-linux tests/ts/schedutils/cpuset and tests/expected/schedutils/cpuset:
    /// (input, mask, list as 2.42 prints it).
    const MASK_VECTORS: &[(&str, &str, &str)] = &[
        ("0x00000001", "1", "0"),
        ("0x00000002", "2", "1"),
        ("0x00000003", "3", "0,1"),
        ("0x00000004", "4", "2"),
        ("0x00000005", "5", "0,2"),
        ("0x00000006", "6", "1,2"),
        ("0x00000007", "7", "0-2"),
        ("0x00000008", "8", "3"),
        ("0x00000009", "9", "0,3"),
        ("0x00005555", "5555", "0-14:2"),
        ("0x00007777", "7777", "0-2,4-6,8-10,12-14"),
    ];
    const LIST_VECTORS: &[(&str, &str, &str)] = &[
        ("0", "1", "0"),
        ("1", "2", "1"),
        ("0,1", "3", "0,1"),
        ("2", "4", "2"),
        ("0,2", "5", "0,2"),
        ("1,2", "6", "1,2"),
        ("0-2", "7", "0-2"),
        ("3", "8", "3"),
        ("0,3", "9", "0,3"),
        ("0,2,4,6,8,10,12,14", "5555", "0-14:2"),
        ("0-2,4-6,8-10,12-14", "7777", "0-2,4-6,8-10,12-14"),
    ];

    #[test]
    fn util_linux_mask_vectors() {
        for (input, mask, list) in MASK_VECTORS {
            let set = CpuSet::parse_mask(input).unwrap();
            assert_eq!(set.to_mask(), *mask, "{input}");
            assert_eq!(set.to_list_strided(), *list, "{input}");
            assert_eq!(CpuSet::parse_list(list).unwrap(), set, "{list}");
        }
    }

    #[test]
    fn util_linux_list_vectors() {
        for (input, mask, list) in LIST_VECTORS {
            let set = CpuSet::parse_list(input).unwrap();
            assert_eq!(set.to_mask(), *mask, "{input}");
            assert_eq!(set.to_list_strided(), *list, "{input}");
        }
    }

    #[test]
    fn classic_format_as_util_linux_2_38() {
        let cases = [
            ("0x5555", "0,2,4,6,8,10,12,14"),
            ("0x7777", "0-2,4-6,8-10,12-14"),
            ("0x3", "0,1"),
            ("0x7", "0-2"),
            ("0x1b", "0,1,3,4"),
            ("0", ""),
        ];
        for (mask, list) in cases {
            assert_eq!(CpuSet::parse_mask(mask).unwrap().to_list(), list, "{mask}");
        }
    }

    #[test]
    fn strided_forms() {
        let set = CpuSet::parse_list("0-14:2").unwrap();
        assert_eq!(set.to_mask(), "5555");
        assert_eq!(CpuSet::parse_list("1-9:4").unwrap().to_list(), "1,5,9");
        assert_eq!(
            CpuSet::parse_list("0,1,3,5,7").unwrap().to_list_strided(),
            "0,1-7:2"
        );
        assert_eq!(
            CpuSet::parse_list("0,1,2,4").unwrap().to_list_strided(),
            "0-2,4"
        );
        assert_eq!(CpuSet::parse_list("0,4").unwrap().to_list_strided(), "0,4");
        assert_eq!(CpuSet::parse_list("3-3:5").unwrap().to_list(), "3");
    }

    #[test]
    fn sysfs_and_wide_masks() {
        let set = CpuSet::parse_mask("00000000,00000003").unwrap();
        assert_eq!(set.to_list(), "0,1");
        let set = CpuSet::parse_mask("80000000,00000000,00000001").unwrap();
        assert_eq!(set.to_list(), "0,95");
        assert_eq!(set.to_mask(), "800000000000000000000001");
        assert_eq!(CpuSet::parse_mask("ff").unwrap().to_list(), "0-7");
        assert_eq!(CpuSet::parse_mask("FF").unwrap().to_list(), "0-7");
        assert_eq!(
            CpuSet::parse_list("64-66").unwrap().to_mask(),
            "70000000000000000"
        );
        // An empty mask is the empty set, as in util-linux.
        assert!(CpuSet::parse_mask("").unwrap().is_empty());
        assert!(CpuSet::parse_mask("0x").unwrap().is_empty());
        assert!(CpuSet::parse_mask("3,").unwrap().contains(1));
    }

    #[test]
    fn rejected_lists_with_util_linux_messages() {
        // Every one of these makes `taskset -c LIST true` print
        // "taskset: failed to parse CPU list: LIST" (checked on util-linux 2.38
        // and 2.42, except "0 ,1" which only 2.38's sscanf accepted; "8192"
        // and "0-9999" are ours: taskset drops CPUs beyond its mask size).
        for bad in [
            "", ",", "0,,1", "1,", ",1", "0-", "-1", "0-2:", "0-2:0", "2-1", "a", "0x3", " 0",
            "1-3 ", "0 ,1", "0-3:2x", "1-2-3", "1:2", "+1", "1.5", "8192", "0-9999",
        ] {
            let err = CpuSet::parse_list(bad).unwrap_err();
            assert_eq!(err.to_string(), format!("failed to parse CPU list: {bad}"));
            assert!(!err.reason().is_empty());
        }
        assert_eq!(
            CpuSet::parse_list("2-1").unwrap_err().reason(),
            "range 2-1 ends before it starts"
        );
        assert_eq!(
            CpuSet::parse_list("0-2:0").unwrap_err().reason(),
            "stride 0"
        );
    }

    #[test]
    fn rejected_masks_with_util_linux_messages() {
        for bad in ["0xg", "g", "0X3", "3,,3", ",3", "0x0x1", "1 "] {
            let err = CpuSet::parse_mask(bad).unwrap_err();
            assert_eq!(err.to_string(), format!("failed to parse CPU mask: {bad}"));
        }
        let huge = format!("1{}", "0".repeat(2048));
        assert!(CpuSet::parse_mask(&huge).is_err());
    }

    #[test]
    fn set_operations() {
        let a = CpuSet::parse_list("0-3").unwrap();
        let b = CpuSet::parse_list("2-5,100").unwrap();
        assert_eq!(a.union(&b).to_list(), "0-5,100");
        assert_eq!(a.intersection(&b).to_list(), "2,3");
        assert_eq!(a.difference(&b).to_list(), "0,1");
        assert!(CpuSet::parse_list("1").unwrap().is_subset(&a));
        assert!(!b.is_subset(&a));
        assert_eq!(b.len(), 5);
        assert_eq!(b.last(), Some(100));
        let mut c = b.clone();
        c.remove(100);
        assert_eq!(c.words().len(), 1);
        assert_eq!(c, CpuSet::from_cpus([5, 4, 3, 2]));
        assert_eq!("0-1".parse::<CpuSet>().unwrap().to_string(), "0,1");
    }

    #[test]
    fn json_round_trip() {
        let set = CpuSet::parse_list("0-2,8").unwrap();
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, "\"0-2,8\"");
        assert_eq!(serde_json::from_str::<CpuSet>(&json).unwrap(), set);
        assert!(serde_json::from_str::<CpuSet>("\"\"").unwrap().is_empty());
    }

    /// Our taskset-style formatting equals what the real `taskset -pc`
    /// prints for the same affinity, on this machine.
    #[test]
    fn format_matches_real_taskset() {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| CpuSet::parse_list(s.trim()).ok());
        let Some(online) = online else {
            eprintln!("skipped: cannot read /sys/devices/system/cpu/online");
            return;
        };
        if std::process::Command::new("taskset")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("skipped: taskset is not installed");
            return;
        }
        // Every single CPU, the whole online set, and every other CPU.
        let mut sets: Vec<CpuSet> = online.iter().map(|c| CpuSet::from_cpus([c])).collect();
        sets.push(online.clone());
        sets.push(CpuSet::from_cpus(online.iter().step_by(2)));
        for set in sets {
            let mut child = std::process::Command::new("taskset")
                .args(["-c", &set.to_list_strided(), "sleep", "30"])
                .spawn()
                .expect("spawn taskset");
            // taskset execs sleep once the affinity is set; wait for that.
            let pid = child.id();
            let mut printed = String::new();
            for _ in 0..200 {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "sleep" {
                    let out = std::process::Command::new("taskset")
                        .args(["-pc", &pid.to_string()])
                        .output()
                        .expect("run taskset -pc");
                    printed = String::from_utf8_lossy(&out.stdout).into_owned();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            let expected = format!("pid {pid}'s current affinity list: {}\n", set.to_list());
            let strided = format!(
                "pid {pid}'s current affinity list: {}\n",
                set.to_list_strided()
            );
            assert!(
                printed == expected || printed == strided,
                "taskset printed {printed:?}, we format {expected:?}"
            );
        }
    }
}
