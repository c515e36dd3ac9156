//! MAC addresses: QEMU's defaults, parsing and printing.

/// QEMU's first default MAC address; the n-th NIC gets `...:56 + n`.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// Parse `52:54:00:12:34:56` (also with `-`): six hex bytes, unicast.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!(
            "'{s}' is not a MAC address (six hex bytes like 52:54:00:12:34:56)"
        ));
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 2 {
            return Err(format!(
                "'{s}' is not a MAC address (six hex bytes like 52:54:00:12:34:56)"
            ));
        }
        m[i] = u8::from_str_radix(p, 16)
            .map_err(|_| format!("'{s}' is not a MAC address (bad byte '{p}')"))?;
    }
    if m[0] & 1 != 0 {
        return Err(format!(
            "'{s}' is a multicast MAC address; a NIC needs a unicast one"
        ));
    }
    Ok(m)
}

/// Format a MAC address like QEMU.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:99").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x99]
        );
        assert_eq!(parse_mac("02-00-00-00-00-0A").unwrap()[5], 10);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(format_mac(&default_mac(0)), "52:54:00:12:34:56");
        assert_eq!(format_mac(&default_mac(1)), "52:54:00:12:34:57");
    }
}
