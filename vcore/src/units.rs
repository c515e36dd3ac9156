//! Sizes parsed and printed the way QEMU does.
//!
//! Parsing follows QEMU's `qemu_strtosz` (util/cutils.c):
//!
//! * a decimal number, optionally with a fraction, or a hexadecimal number
//!   (`0x1000`, no fraction and no suffix allowed);
//! * one optional suffix, case-insensitive and 1024-based: `b`/`B` (bytes),
//!   `k`/`K`, `M`, `G`, `T`, `P`, `E` (QEMU 8+ rules: `.5G` is accepted,
//!   a suffix on a hex number is not);
//! * without a suffix the caller's default unit applies ([`Suffix::B`] for
//!   image sizes, [`Suffix::M`] for `-m`);
//! * a fraction needs a unit other than bytes (`1.5G` is fine, `1.5` is not
//!   for image sizes); the result is rounded to the nearest byte, half up;
//! * anything else is rejected: `1KiB`, `1Gi`, `1e3`, `-1`, `abc`, `1 G`, ``.
//!
//! Printing follows QEMU's `size_to_str`: `"%0.3g %sB"` with 1024-based
//! units, switching to the next unit when the value would reach 1000
//! (`999 KiB`, `0.977 MiB`, `1.46 MiB`, `1 GiB`).
//!
//! ```
//! use vcore::units::{parse_size, size_to_str, size_with_bytes, Suffix};
//! assert_eq!(parse_size("1.5G", Suffix::B).unwrap(), 1610612736);
//! assert_eq!(parse_size("512", Suffix::M).unwrap(), 512 << 20);
//! assert_eq!(size_to_str(1024000), "0.977 MiB");
//! assert_eq!(size_with_bytes(1 << 30), "1 GiB (1073741824 bytes)");
//! ```

use std::fmt;

/// 1 KiB in bytes.
pub const KIB: u64 = 1 << 10;
/// 1 MiB in bytes.
pub const MIB: u64 = 1 << 20;
/// 1 GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// Largest image size qemu-img accepts (`INT64_MAX`).
pub const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;

/// A size unit, used as the default when a number has no suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suffix {
    /// Bytes (`b`, `B`).
    B,
    /// KiB (`k`, `K`).
    K,
    /// MiB (`m`, `M`).
    M,
    /// GiB (`g`, `G`).
    G,
    /// TiB (`t`, `T`).
    T,
    /// PiB (`p`, `P`).
    P,
    /// EiB (`e`, `E`).
    E,
}

impl Suffix {
    /// The suffix for a character, case-insensitive (`k` → `K`), or `None`.
    pub fn from_char(c: char) -> Option<Suffix> {
        Some(match c.to_ascii_uppercase() {
            'B' => Suffix::B,
            'K' => Suffix::K,
            'M' => Suffix::M,
            'G' => Suffix::G,
            'T' => Suffix::T,
            'P' => Suffix::P,
            'E' => Suffix::E,
            _ => return None,
        })
    }

    /// How many bytes one unit holds (`K` → 1024).
    pub fn multiplier(self) -> u64 {
        1u64 << (10 * self.exponent())
    }

    fn exponent(self) -> u32 {
        match self {
            Suffix::B => 0,
            Suffix::K => 1,
            Suffix::M => 2,
            Suffix::G => 3,
            Suffix::T => 4,
            Suffix::P => 5,
            Suffix::E => 6,
        }
    }
}

/// Why a size was rejected. `Display` gives a sentence naming the value;
/// [`SizeError::qemu_img_message`] and [`SizeError::qemu_option_message`]
/// give QEMU's own wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (`1KiB`, `1e3`, `-1`, `abc`, `1.5` without a unit).
    Invalid {
        /// The text as given.
        value: String,
    },
    /// A size, but larger than the caller allows (or than 2^64 - 1).
    TooLarge {
        /// The text as given.
        value: String,
        /// The largest size accepted, in bytes.
        max: u64,
    },
}

impl SizeError {
    /// The text that was rejected.
    pub fn value(&self) -> &str {
        match self {
            SizeError::Invalid { value } | SizeError::TooLarge { value, .. } => value,
        }
    }

    /// qemu-img 10's message for a size argument called `name` (qemu-img
    /// uses `"image size"`):
    /// `Invalid image size specified: '1KiB'.` or
    /// `Invalid image size specified. Must be between 0 and 9223372036854775807.`
    pub fn qemu_img_message(&self, name: &str) -> String {
        match self {
            SizeError::Invalid { value } => format!("Invalid {name} specified: '{value}'."),
            SizeError::TooLarge { max, .. } => {
                format!("Invalid {name} specified. Must be between 0 and {max}.")
            }
        }
    }

    /// The wording of qemu-img before 10 (and of the brief's examples), two
    /// lines: `Invalid image size specified. You may use k, M, G, T, P or E
    /// suffixes for` / `kilobytes, megabytes, gigabytes, terabytes, petabytes
    /// and exabytes.`
    pub fn qemu_img_legacy_message(&self, name: &str) -> String {
        match self {
            SizeError::Invalid { .. } => format!(
                "Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n\
                 kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
            ),
            SizeError::TooLarge { .. } => self.qemu_img_message(name),
        }
    }

    /// QEMU's option-parser message (what `qemu-system-x86_64 -m 1KiB` and
    /// `qemu-img resize` print), three lines:
    /// `Parameter 'size' expects a non-negative number below 2^64` /
    /// `Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-` /
    /// `and exabytes, respectively.`
    pub fn qemu_option_message(&self, param: &str) -> String {
        format!(
            "Parameter '{param}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )
    }
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Invalid { value } => write!(
                f,
                "invalid size '{value}': use a number with an optional k, M, G, T, P or E \
                 suffix (1024-based), e.g. 512M, 1.5G or 0x1000"
            ),
            SizeError::TooLarge { value, max } => {
                write!(f, "size '{value}' is too large: the maximum is {max} bytes")
            }
        }
    }
}

impl std::error::Error for SizeError {}

/// Parse a size like QEMU's `qemu_strtosz`; a number without a suffix is in
/// `default_suffix` units. Accepts up to 2^64 - 1 bytes.
///
/// `parse_size("1.5G", Suffix::B)` = 1610612736, `parse_size("0x1000", Suffix::B)`
/// = 4096, `parse_size("512", Suffix::M)` = 536870912.
pub fn parse_size(s: &str, default_suffix: Suffix) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid {
        value: s.to_string(),
    };
    let too_large = || SizeError::TooLarge {
        value: s.to_string(),
        max: u64::MAX,
    };
    // parse_uint skips leading white space, nothing else does.
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let b = t.as_bytes();
    if b.first() == Some(&b'-') {
        return Err(invalid());
    }
    // strtoull takes one leading '+'.
    let t = t.strip_prefix('+').unwrap_or(t);
    let b = t.as_bytes();
    let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();

    // Hexadecimal: "0x..." with no fraction and no suffix.
    if int_len > 0
        && t[..int_len].bytes().all(|c| c == b'0')
        && matches!(b.get(int_len), Some(b'x' | b'X'))
    {
        if int_len != 1 {
            // strtoull reads "00x10" as 0 followed by garbage.
            return Err(invalid());
        }
        let hex = &t[2..];
        let hex_len = hex.bytes().take_while(|c| c.is_ascii_hexdigit()).count();
        if hex_len == 0 || hex_len != hex.len() {
            return Err(invalid());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| too_large());
    }

    let mut rest = &t[int_len..];
    let mut int: u64 = if int_len > 0 {
        t[..int_len].parse().map_err(|_| too_large())?
    } else {
        0
    };
    // The fraction as a 64-bit binary fixed-point number (QEMU: valf).
    let mut frac: u64 = 0;
    if let Some(after_dot) = rest.strip_prefix('.') {
        let digits = after_dot.bytes().take_while(|c| c.is_ascii_digit()).count();
        if int_len == 0 && digits == 0 {
            return Err(invalid());
        }
        let fraction: f64 = if digits == 0 {
            0.0
        } else {
            format!("0.{}", &after_dot[..digits])
                .parse()
                .map_err(|_| invalid())?
        };
        rest = &after_dot[digits..];
        if fraction >= 1.0 {
            int = int.checked_add(1).ok_or_else(too_large)?;
        } else if fraction > 0.0 {
            // An f64 in (0, 1) times 2^64 fits in u64 (saturating cast).
            frac = ((fraction * 18446744073709551616.0) as u64).max(1);
        }
    } else if int_len == 0 {
        return Err(invalid());
    }

    let mut chars = rest.chars();
    let unit = match chars.next() {
        None => default_suffix,
        Some(c) => match Suffix::from_char(c) {
            Some(u) if chars.as_str().is_empty() => u,
            _ => return Err(invalid()),
        },
    };
    let mul = unit.multiplier();
    if mul == 1 {
        if frac != 0 {
            return Err(invalid());
        }
        return Ok(int);
    }
    // Exact 64.64 fixed point times the unit, rounding 0.5 up.
    let whole = (int as u128) * (mul as u128);
    let part = (frac as u128) * (mul as u128);
    let rounded = (part + (1u128 << 63)) >> 64;
    let total = whole + rounded;
    u64::try_from(total).map_err(|_| too_large())
}

/// Parse an image size the way `qemu-img create`/`resize` do: bare numbers
/// are bytes, the limit is `INT64_MAX`. The value is not rounded; use
/// [`round_up`] with 512 for QEMU's sector rounding.
pub fn parse_image_size(s: &str) -> Result<u64, SizeError> {
    let v = parse_size(s, Suffix::B).map_err(|e| match e {
        SizeError::TooLarge { value, .. } => SizeError::TooLarge {
            value,
            max: MAX_IMAGE_SIZE,
        },
        other => other,
    })?;
    if v > MAX_IMAGE_SIZE {
        return Err(SizeError::TooLarge {
            value: s.to_string(),
            max: MAX_IMAGE_SIZE,
        });
    }
    Ok(v)
}

/// Parse a guest memory size like QEMU's `-m`: a bare number is MiB
/// (`-m 512`, `-m 0x100` = 256 MiB), a suffix gives the unit (`-m 1.5G`,
/// `-m 4096k`). A fraction needs a suffix (`-m 1.5` is rejected, as in QEMU).
/// The result is not aligned; QEMU rounds it up to 8 KiB.
pub fn parse_mem_size(s: &str) -> Result<u64, SizeError> {
    // QEMU parses with byte default, then multiplies "suffix-less" values
    // (last character a digit) by 1 MiB.
    let bytes = parse_size(s, Suffix::B)?;
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        return bytes.checked_mul(MIB).ok_or(SizeError::TooLarge {
            value: s.to_string(),
            max: u64::MAX,
        });
    }
    Ok(bytes)
}

/// `n` rounded up to a multiple of `align` (a power of two or any non-zero
/// value); saturates at the largest multiple that fits.
pub fn round_up(n: u64, align: u64) -> u64 {
    if align <= 1 {
        return n;
    }
    match n.checked_add(align - 1) {
        Some(v) => v / align * align,
        None => u64::MAX / align * align,
    }
}

/// QEMU's human-readable size (`size_to_str`): `"%0.3g %sB"` with units
/// B, KiB, MiB, GiB, TiB, PiB, EiB; the next unit is used once the number
/// would reach 1000. `0` → `0 B`, `512` → `512 B`, `1024000` → `0.977 MiB`,
/// `1<<30` → `1 GiB`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) exponent, i.e. floor(log2(val*1.024)) + 1.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled == 0.0 {
        0
    } else {
        // Normal doubles: exponent bits give floor(log2) exactly.
        let bits = scaled.to_bits();
        ((bits >> 52) & 0x7ff) as i32 - 1023 + 1
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

/// qemu-img's `"%s (%" PRId64 " bytes)"` form: `1 GiB (1073741824 bytes)`.
pub fn size_with_bytes(val: u64) -> String {
    format!("{} ({val} bytes)", size_to_str(val))
}

/// The shortest exact suffix form, as the kernel's `hugepagesz=` and
/// hugetlbfs `pagesize=` take it: `2097152` → `2M`, `1<<30` → `1G`,
/// `65536` → `64K`, `1000` → `1000` (bytes, no exact unit).
pub fn size_to_suffix(val: u64) -> String {
    const UNITS: [(u32, char); 6] = [
        (60, 'E'),
        (50, 'P'),
        (40, 'T'),
        (30, 'G'),
        (20, 'M'),
        (10, 'K'),
    ];
    if val != 0 {
        for (shift, c) in UNITS {
            if val.trailing_zeros() >= shift {
                return format!("{}{c}", val >> shift);
            }
        }
    }
    val.to_string()
}

/// C's `%0.3g` for a finite, non-negative value.
fn format_g3(v: f64) -> String {
    const P: i32 = 3;
    if v == 0.0 {
        return "0".to_string();
    }
    // Round to P significant digits first to find the decimal exponent.
    let e_form = format!("{:.*e}", (P - 1) as usize, v);
    let (mantissa, exp) = e_form.split_once('e').unwrap_or((&e_form, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    if !(-4..P).contains(&x) {
        let m = strip_zeros(mantissa);
        let sign = if x < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", x.abs())
    } else {
        strip_zeros(&format!("{:.*}", (P - 1 - x) as usize, v)).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_accepted_sizes() {
        // Vectors from qemu-img 10.0.2 (`qemu-img create -f raw x SIZE`),
        // before its rounding up to 512.
        let cases: &[(&str, u64)] = &[
            ("1", 1),
            ("1000", 1000),
            ("10b", 10),
            ("10B", 10),
            ("1.5G", 1610612736),
            ("1.1k", 1126), // 1126.4 → 1126; qemu-img then rounds to 1536
            ("0x1000", 4096),
            ("0X10", 16),
            ("1g", GIB),
            ("1G", GIB),
            ("512m", 512 * MIB),
            ("512M", 512 * MIB),
            ("1k", 1024),
            ("1K", 1024),
            ("2T", 2 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("1.k", 1024),
            (".5k", 512),
            ("0.5M", 512 * KIB),
            ("0", 0),
            (" 1G", GIB),
            ("1.", 1),
            ("+1", 1),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_size(s, Suffix::B), Ok(want), "{s:?}");
        }
        assert_eq!(round_up(parse_size("1", Suffix::B).unwrap(), 512), 512);
        assert_eq!(round_up(parse_size("1000", Suffix::B).unwrap(), 512), 1024);
        assert_eq!(round_up(parse_size("1.1k", Suffix::B).unwrap(), 512), 1536);
        assert_eq!(round_up(parse_size("10b", Suffix::B).unwrap(), 512), 512);
    }

    #[test]
    fn qemu_rejected_sizes() {
        for s in [
            "1KiB", "1Gi", "1e3", "1.5", "abc", "1 G", "", "-1", "1G ", "0x", "0x1.5", "0x10k",
            "1.5e3G", "1kk", ".", ".k", "++1", "1,5G", "00x10", "+-1",
        ] {
            assert_eq!(
                parse_size(s, Suffix::B),
                Err(SizeError::Invalid {
                    value: s.to_string()
                }),
                "{s:?}"
            );
        }
    }

    #[test]
    fn overflow() {
        assert!(matches!(
            parse_size("16E", Suffix::B),
            Err(SizeError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_size("18446744073709551616", Suffix::B),
            Err(SizeError::TooLarge { .. })
        ));
        assert_eq!(parse_size("18446744073709551615", Suffix::B), Ok(u64::MAX));
        assert_eq!(parse_size("0xffffffffffffffff", Suffix::B), Ok(u64::MAX));
        assert!(parse_size("0x10000000000000000", Suffix::B).is_err());
        // qemu-img: 8E is a valid number but above INT64_MAX.
        let e = parse_image_size("8E").unwrap_err();
        assert_eq!(
            e.qemu_img_message("image size"),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(parse_image_size("7E"), Ok(7 << 60));
    }

    #[test]
    fn messages() {
        let e = parse_image_size("1KiB").unwrap_err();
        assert_eq!(
            e.qemu_img_message("image size"),
            "Invalid image size specified: '1KiB'."
        );
        assert_eq!(
            e.qemu_img_legacy_message("image size"),
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n\
             kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        );
        assert_eq!(
            e.qemu_option_message("size"),
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        );
        assert_eq!(e.value(), "1KiB");
        assert!(e.to_string().contains("'1KiB'"), "{e}");
    }

    #[test]
    fn mem_sizes_like_dash_m() {
        // qemu-system-x86_64 -m: bare numbers (last char a digit) are MiB.
        assert_eq!(parse_mem_size("512"), Ok(512 * MIB));
        assert_eq!(parse_mem_size("0x100"), Ok(256 * MIB));
        assert_eq!(parse_mem_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_mem_size("1.5G"), Ok(1536 * MIB));
        assert_eq!(parse_mem_size("4096k"), Ok(4 * MIB));
        assert_eq!(parse_mem_size("1048576b"), Ok(MIB));
        // Rejected by qemu-system-x86_64 7.2 with "Parameter 'size' expects...".
        for s in ["1.5", "1KiB", "1e3", "-1", "abc", "1 G"] {
            assert!(parse_mem_size(s).is_err(), "{s:?}");
        }
        assert!(matches!(
            parse_mem_size("17592186044416"),
            Err(SizeError::TooLarge { .. })
        ));
        // Default suffix M directly.
        assert_eq!(parse_size("1.5", Suffix::M), Ok(1536 * KIB));
    }

    #[test]
    fn human_sizes_like_qemu() {
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (1, "1 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1023, "0.999 KiB"),
            (1024, "1 KiB"),
            (4096, "4 KiB"),
            (999 * 1024, "999 KiB"),
            (1024000, "0.977 MiB"),
            (1536 * 1024, "1.5 MiB"),
            (1_535_000, "1.46 MiB"),
            (123457024, "118 MiB"),
            (196 * 1024, "196 KiB"),
            (197120, "192 KiB"), // 192.5: round half to even, like glibc
            (536871424, "512 MiB"),
            (GIB, "1 GiB"),
            (1610612736, "1.5 GiB"),
            (20 * GIB, "20 GiB"),
            (1 << 60, "1 EiB"),
            (u64::MAX, "16 EiB"),
            (1023999, "1e+03 KiB"),
        ];
        for &(v, want) in cases {
            assert_eq!(size_to_str(v), want, "{v}");
        }
        assert_eq!(size_with_bytes(GIB), "1 GiB (1073741824 bytes)");
        assert_eq!(size_with_bytes(197120), "192 KiB (197120 bytes)");
        assert_eq!(size_with_bytes(123457024), "118 MiB (123457024 bytes)");
        assert_eq!(size_with_bytes(1024000), "0.977 MiB (1024000 bytes)");
    }

    #[test]
    fn suffix_form() {
        assert_eq!(size_to_suffix(2 * MIB), "2M");
        assert_eq!(size_to_suffix(GIB), "1G");
        assert_eq!(size_to_suffix(64 * KIB), "64K");
        assert_eq!(size_to_suffix(1536 * MIB), "1536M");
        assert_eq!(size_to_suffix(1000), "1000");
        assert_eq!(size_to_suffix(0), "0");
        for v in [2 * MIB, GIB, 64 * KIB, 1000, 0, 1 << 62] {
            assert_eq!(parse_size(&size_to_suffix(v), Suffix::B), Ok(v));
        }
    }

    #[test]
    fn g3_formatting() {
        assert_eq!(format_g3(1.125), "1.12");
        assert_eq!(format_g3(0.9765625), "0.977");
        assert_eq!(format_g3(999.999), "1e+03");
        assert_eq!(format_g3(2.5), "2.5");
        assert_eq!(format_g3(0.25), "0.25");
        assert_eq!(format_g3(100.0), "100");
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, 512), 0);
        assert_eq!(round_up(1, 512), 512);
        assert_eq!(round_up(512, 512), 512);
        assert_eq!(round_up(196624, 512), 197120);
        assert_eq!(round_up(5, 1), 5);
        assert_eq!(round_up(u64::MAX, 512), u64::MAX / 512 * 512);
        assert_eq!(round_up(3 * MIB, 2 * MIB), 4 * MIB);
    }

    /// qemu-img as the oracle: `create` accepts, rounds and rejects sizes as
    /// parse_image_size does, with the same messages; `info` prints sizes as
    /// size_with_bytes does.
    #[test]
    fn qemu_img_oracle() {
        use std::process::Command;
        let Ok(v) = Command::new("qemu-img").arg("--version").output() else {
            eprintln!("skipping qemu_img_oracle: qemu-img not installed");
            return;
        };
        eprintln!(
            "oracle: {}",
            String::from_utf8_lossy(&v.stdout)
                .lines()
                .next()
                .unwrap_or("")
        );
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.raw");
        for s in [
            "1",
            "1000",
            "10b",
            "1.5G",
            "1.1k",
            "0x1000",
            "1g",
            "512m",
            ".5k",
            "1.",
            "+1",
            " 1G",
            "123456789",
            "1KiB",
            "1Gi",
            "1e3",
            "1.5",
            "abc",
            "1 G",
            "",
            "0x10k",
            "00x10",
            "-1",
            "8E",
            "16E",
            "1kk",
        ] {
            let _ = std::fs::remove_file(&img);
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&img)
                .arg(s)
                .output()
                .unwrap();
            let ours = parse_image_size(s);
            match ours {
                Ok(n) => {
                    assert!(o.status.success(), "{s:?}: qemu-img failed: {o:?}");
                    let len = std::fs::metadata(&img).unwrap().len();
                    assert_eq!(len, round_up(n, 512), "{s:?}");
                }
                Err(e) if s == "-1" => {
                    // qemu-img takes "-1" as an option; we reject it as a size.
                    assert!(!o.status.success());
                    assert!(matches!(e, SizeError::Invalid { .. }));
                }
                Err(e) => {
                    assert!(!o.status.success(), "{s:?}: qemu-img accepted it");
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert_eq!(
                        err.trim_end(),
                        format!("qemu-img: {}", e.qemu_img_message("image size")),
                        "{s:?}"
                    );
                }
            }
        }
        for n in [
            512u64,
            1024000,
            1536 * KIB,
            123457024,
            197120,
            GIB,
            20 * GIB,
            1023 * 1024,
        ] {
            let _ = std::fs::remove_file(&img);
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&img)
                .arg(n.to_string())
                .output()
                .unwrap();
            assert!(o.status.success());
            let o = Command::new("qemu-img")
                .args(["info", "-f", "raw"])
                .arg(&img)
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            let want = format!("virtual size: {}\n", size_with_bytes(n));
            assert!(out.contains(&want), "{n}: {out}");
        }
    }
}
