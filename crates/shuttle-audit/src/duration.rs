//! `--since` durations: `90s`, `15m`, `2h`, `7d`.

use std::time::Duration;

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text was empty.
    #[error("empty duration: write a number and a unit, e.g. 90s, 15m, 2h or 7d")]
    Empty,
    /// The number part was missing or not a whole number.
    #[error("invalid duration {0:?}: write a whole number and a unit, e.g. 90s, 15m, 2h or 7d")]
    InvalidNumber(String),
    /// The unit was missing or unknown.
    #[error("invalid duration {0:?}: the unit must be s, m, h or d (e.g. 90s, 15m, 2h, 7d)")]
    InvalidUnit(String),
    /// The duration does not fit in 64-bit seconds.
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

/// Parses a duration written as a whole number followed by one unit: `s` (seconds), `m`
/// (minutes), `h` (hours) or `d` (days), e.g. `90s`, `15m`, `2h`, `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| DurationError::InvalidUnit(text.to_owned()))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(DurationError::InvalidNumber(text.to_owned()));
    }
    let multiplier: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(DurationError::InvalidUnit(text.to_owned())),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| DurationError::TooLarge(text.to_owned()))?;
    let secs = number
        .checked_mul(multiplier)
        .ok_or_else(|| DurationError::TooLarge(text.to_owned()))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 7d "), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("90"),
            Err(DurationError::InvalidUnit(_))
        ));
        assert!(matches!(
            parse_duration("h"),
            Err(DurationError::InvalidNumber(_))
        ));
        assert!(matches!(
            parse_duration("-5m"),
            Err(DurationError::InvalidNumber(_))
        ));
        assert!(matches!(
            parse_duration("5w"),
            Err(DurationError::InvalidUnit(_))
        ));
        assert!(matches!(
            parse_duration("1.5h"),
            Err(DurationError::InvalidUnit(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::TooLarge(_))
        ));
        assert!(matches!(
            parse_duration("999999999999999999d"),
            Err(DurationError::TooLarge(_))
        ));
    }
}
