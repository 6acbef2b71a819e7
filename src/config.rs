//! From raw command-line values to validated settings with units in their names. Human units are parsed here,
//! at the edge: durations (`300ms`, `5m`) by humantime, sizes and rates (`1GiB/s`, `32MiB/s`) by bytesize.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

/// Parses a duration such as `300ms`, `2s`, `5m`.
pub fn duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| ConfigError::Invalid {
        flag,
        value: value.into(),
        reason: format!("not a duration ({e}); try 300ms, 2s or 5m"),
    })
}

/// Parses a rate in bytes per second: `1GiB/s`, `32MiB/s`, `100MB/s` (the `/s` is optional).
pub fn rate_bytes_per_s(flag: &'static str, value: &str) -> Result<u64, ConfigError> {
    let v = value.trim();
    let v = v
        .strip_suffix("/s")
        .or_else(|| v.strip_suffix("ps"))
        .unwrap_or(v);
    let bytes: bytesize::ByteSize = v.trim().parse().map_err(|e| ConfigError::Invalid {
        flag,
        value: value.into(),
        reason: format!("not a rate ({e}); try 1GiB/s or 32MiB/s"),
    })?;
    if bytes.as_u64() == 0 {
        return Err(ConfigError::Invalid {
            flag,
            value: value.into(),
            reason: "must be more than zero".into(),
        });
    }
    Ok(bytes.as_u64())
}

/// Parses a size such as `32MiB` or `1GiB`.
pub fn size_bytes(flag: &'static str, value: &str) -> Result<u64, ConfigError> {
    value
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| ConfigError::Invalid {
            flag,
            value: value.into(),
            reason: format!("not a size ({e}); try 32MiB or 1GiB"),
        })
}

/// Checks that the downtime limits are ordered and non-zero.
pub fn downtimes(downtime: Duration, max_downtime: Duration) -> Result<(), ConfigError> {
    if downtime.is_zero() {
        return Err(ConfigError::Invalid {
            flag: "downtime",
            value: "0".into(),
            reason: "must be more than zero".into(),
        });
    }
    if max_downtime < downtime {
        return Err(ConfigError::Invalid {
            flag: "max-downtime",
            value: humantime::format_duration(max_downtime).to_string(),
            reason: format!(
                "is below --downtime {}",
                humantime::format_duration(downtime)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_table() {
        let table = [
            ("1GiB/s", Some(1u64 << 30)),
            ("32MiB/s", Some(32 << 20)),
            ("32 MiB/s", Some(32 << 20)),
            ("100MB/s", Some(100_000_000)),
            ("512KiB", Some(512 << 10)),
            ("0MiB/s", None),
            ("fast", None),
            ("-5MiB/s", None),
        ];
        for (input, want) in table {
            assert_eq!(rate_bytes_per_s("bandwidth", input).ok(), want, "{input}");
        }
    }

    #[test]
    fn durations_and_ordering() {
        assert_eq!(duration("timeout", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            duration("downtime", "300ms").unwrap(),
            Duration::from_millis(300)
        );
        let e = duration("timeout", "soon").unwrap_err().to_string();
        assert!(e.starts_with("--timeout \"soon\""), "{e}");
        assert!(downtimes(Duration::from_millis(300), Duration::from_millis(200)).is_err());
        assert!(downtimes(Duration::from_millis(300), Duration::from_millis(300)).is_ok());
        assert!(downtimes(Duration::ZERO, Duration::from_millis(300)).is_err());
    }
}
