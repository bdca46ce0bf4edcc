//! Go `time.Duration` strings, as CrowdSec's LAPI writes decision durations:
//! `"3h59m59.022376539s"` (before 1.6.3, nanosecond precision), `"3h59m59s"` (after),
//! `"-143.605213ms"` (deleted entries), `"1.5µs"`, `"12ns"`, `"0s"`. Same grammar as Go's
//! `time.ParseDuration`: an optional sign, then one or more decimal numbers each with a unit
//! (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`); a bare `0` is zero.

/// Parses a Go duration into signed nanoseconds. As Go, a duration past the range of an
/// `i64` of nanoseconds (about 292 years) is refused: Go's LAPI cannot have written it.
pub fn parse_nanos(text: &str) -> Result<i128, String> {
    let bad = || format!("invalid Go duration {text:?}");
    let mut s = text.trim();
    let negative = match s.as_bytes().first() {
        Some(b'-') => {
            s = &s[1..];
            true
        }
        Some(b'+') => {
            s = &s[1..];
            false
        }
        _ => false,
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        // The number: digits, optionally a fraction.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..n];
            s = &rest[n..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        // The unit: everything up to the next digit or '.'.
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("invalid Go duration {text:?}: missing unit")),
            other => {
                return Err(format!(
                    "invalid Go duration {text:?}: unknown unit {other:?}"
                ))
            }
        };
        let int: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad())?
        };
        let mut value = int.saturating_mul(scale);
        if !frac_part.is_empty() {
            // 18 fractional digits are exact to far below a nanosecond for every unit (an hour
            // is 3.6e12 ns), and 10^18 times that scale stays far inside an i128. (With 30,
            // the product saturated and long fractions came out short.)
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: i128 = digits.parse().map_err(|_| bad())?;
            let denom = 10i128.pow(digits.len() as u32);
            value = value.saturating_add(frac.saturating_mul(scale) / denom);
        }
        total = total.saturating_add(value);
    }
    let limit = if negative {
        -(i64::MIN as i128)
    } else {
        i64::MAX as i128
    };
    if total > limit {
        return Err(format!(
            "invalid Go duration {text:?}: out of range (Go's durations end at about 2562047h)"
        ));
    }
    Ok(if negative { -total } else { total })
}

/// Parses a Go duration into signed milliseconds (rounded toward zero).
pub fn parse_millis(text: &str) -> Result<i64, String> {
    let n = parse_nanos(text)? / 1_000_000;
    Ok(n.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crowdsec_durations_across_versions() {
        // 1.4.6 .. 1.6.2: nanosecond precision.
        assert_eq!(
            parse_nanos("3h59m59.022376539s").unwrap(),
            (3 * 3600 + 59 * 60 + 59) * 1_000_000_000i128 + 22_376_539
        );
        assert_eq!(parse_millis("59m59.16866418s").unwrap(), 3_599_168);
        // >= 1.6.3: whole seconds.
        assert_eq!(parse_millis("3h59m59s").unwrap(), 14_399_000);
        // deleted entries: negative.
        assert_eq!(parse_nanos("-143.605213ms").unwrap(), -143_605_213);
        assert_eq!(
            parse_millis("-25422h25m44.086361839s").unwrap(),
            -((25422 * 3600 + 25 * 60 + 44) * 1000 + 86)
        );
        assert_eq!(parse_nanos("1.5\u{b5}s").unwrap(), 1_500);
        assert_eq!(parse_nanos("1.5\u{3bc}s").unwrap(), 1_500);
        assert_eq!(parse_nanos("2us").unwrap(), 2_000);
        assert_eq!(parse_nanos("12ns").unwrap(), 12);
        assert_eq!(parse_nanos("0s").unwrap(), 0);
        assert_eq!(parse_nanos("0").unwrap(), 0);
        assert_eq!(parse_nanos("+1m").unwrap(), 60_000_000_000);
        assert_eq!(parse_nanos(".5s").unwrap(), 500_000_000);
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "-", "10", "1x", "h", "1.s5", "..1s", "1m 2s"] {
            assert!(parse_nanos(bad).is_err(), "{bad:?} should fail");
        }
        // Past Go's range: an i64 of nanoseconds.
        for bad in ["9999999999h", "2562048h", "2562047h47m16.854775808s"] {
            let e = parse_nanos(bad).unwrap_err();
            assert!(e.contains("out of range"), "{bad:?}: {e}");
        }
        assert_eq!(
            parse_nanos("2562047h47m16.854775807s").unwrap(),
            i64::MAX as i128
        );
        assert_eq!(
            parse_nanos("-2562047h47m16.854775808s").unwrap(),
            i64::MIN as i128
        );
    }

    /// Long fractions are exact, as Go's are (a product that saturated cut them short).
    #[test]
    fn long_fractions_keep_their_value() {
        let zeros = |n: usize| "0".repeat(n);
        let cases = [
            (format!("0.5{}m", zeros(27)), 30 * 1_000_000_000i128),
            (format!("0.5{}h", zeros(25)), 1_800 * 1_000_000_000),
            (format!("1.5{}h", zeros(40)), 5_400 * 1_000_000_000),
            (format!("0.5{}s", zeros(29)), 500_000_000),
            (format!("0.{}1s", zeros(8)), 1),
            (format!("1.{}h", "9".repeat(40)), 7_200 * 1_000_000_000 - 1),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_nanos(&text).unwrap(), nanos, "{text}");
        }
    }
}
