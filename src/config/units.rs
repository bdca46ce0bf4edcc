//! Human units in the config file: durations (`"10s"`, `"1m30s"`, `"250ms"`) and byte sizes
//! (`"64KiB"`, `"1MiB"`, `"512"`). Parsed once at load; the rest of the program sees
//! `Duration` and `u64`.

use std::time::Duration;

/// Parses a duration such as `"10s"`, `"1m30s"`, `"250ms"`, `"2h"` or `"1d"`.
///
/// A bare number is rejected: a reviewer should never have to guess whether `30` means
/// seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; expected e.g. \"10s\", \"250ms\", \"1m30s\"".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a number before the unit"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "d" => Duration::from_secs(value.saturating_mul(86_400)),
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit (use ms, s, m, h or d)"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ))
            }
        };
        total = total
            .checked_add(part)
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| format!("invalid duration {text:?}: too large (at most 100 years)"))?;
    }
    Ok(total)
}

/// The longest duration a setting takes: far beyond any timeout, and short enough that a
/// deadline computed from it (now + duration) can never overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a byte size: `"512"`, `"64KiB"`, `"1MiB"`, `"2GiB"`, `"10kB"`, `"1MB"`.
/// Binary units (KiB, MiB, GiB) are powers of 1024; decimal ones (kB, MB, GB) of 1000.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(format!(
            "invalid size {text:?}: expected e.g. \"64KiB\", \"1MiB\""
        ));
    }
    let value: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let multiplier: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, kB, MB or GB)"
            ))
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Formats a duration the way the config file writes it (for `wraith status` and errors).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    if secs > 0 || out.is_empty() {
        out.push_str(&format!("{secs}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_a_hundred_years_are_refused() {
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
        for text in ["36501d", "999999999999999999d", "18446744073709551615s"] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains("too large"), "{text}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("10 s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64KiB").unwrap(), 65_536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn format_round_trips() {
        for s in ["10s", "250ms", "1m30s", "2h", "1d", "0s"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}
