//! `strftime_now(format)`, the date global Hugging Face gives chat templates.
//!
//! Python evaluates `datetime.now().strftime(format)` in the pod's local time
//! zone. vLLM pods run in containers whose zone is UTC unless configured
//! otherwise, so kvgate formats UTC. The date matters for routing: a template
//! that prints "Today Date: 26 Jul 2024" near the top of the prompt puts it in
//! every block hash after it.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC calendar time, split into the fields strftime needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub microsecond: u32,
    /// 0 = Sunday .. 6 = Saturday
    pub weekday: u32,
    /// 1..=366
    pub day_of_year: u32,
}

impl CivilTime {
    pub fn now_utc() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::from_unix(since_epoch.as_secs() as i64, since_epoch.subsec_micros())
    }

    pub fn from_unix(seconds: i64, microsecond: u32) -> Self {
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let day_of_year = (days - days_from_civil(year, 1, 1)) as u32 + 1;
        CivilTime {
            year,
            month,
            day,
            hour: second_of_day / 3600,
            minute: second_of_day / 60 % 60,
            second: second_of_day % 60,
            microsecond,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
            day_of_year,
        }
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Formats like glibc's `strftime` in the C locale, which CPython calls on Linux.
/// Supports the glibc `-` flag (no padding); unknown directives are copied verbatim.
pub fn strftime(format: &str, t: &CivilTime) -> String {
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let Some(spec) = spec else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let number = |out: &mut String, value: i64, width: usize, pad: char| {
            if unpadded {
                let _ = write!(out, "{value}");
            } else if pad == ' ' {
                let _ = write!(out, "{value:>width$}");
            } else {
                let _ = write!(out, "{value:0width$}");
            }
        };
        let weekday_name = WEEKDAYS[t.weekday as usize % 7];
        let month_name = MONTHS[(t.month as usize + 11) % 12];
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        match spec {
            'a' => out.push_str(&weekday_name[..3]),
            'A' => out.push_str(weekday_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'B' => out.push_str(month_name),
            'd' => number(&mut out, t.day.into(), 2, '0'),
            'e' => number(&mut out, t.day.into(), 2, ' '),
            'm' => number(&mut out, t.month.into(), 2, '0'),
            'y' => number(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            'C' => number(&mut out, t.year.div_euclid(100), 2, '0'),
            'H' => number(&mut out, t.hour.into(), 2, '0'),
            'I' => number(&mut out, hour12.into(), 2, '0'),
            'M' => number(&mut out, t.minute.into(), 2, '0'),
            'S' => number(&mut out, t.second.into(), 2, '0'),
            'f' => {
                let _ = write!(out, "{:06}", t.microsecond);
            }
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'j' => number(&mut out, t.day_of_year.into(), 3, '0'),
            'w' => number(&mut out, t.weekday.into(), 1, '0'),
            'u' => number(
                &mut out,
                if t.weekday == 0 { 7 } else { t.weekday.into() },
                1,
                '0',
            ),
            'U' => number(
                &mut out,
                ((t.day_of_year + 6 - t.weekday) / 7).into(),
                2,
                '0',
            ),
            'W' => number(
                &mut out,
                ((t.day_of_year + 6 - (t.weekday + 6) % 7) / 7).into(),
                2,
                '0',
            ),
            'D' => out.push_str(&strftime("%m/%d/%y", t)),
            'F' => out.push_str(&strftime("%Y-%m-%d", t)),
            'T' => out.push_str(&strftime("%H:%M:%S", t)),
            'R' => out.push_str(&strftime("%H:%M", t)),
            'c' => out.push_str(&strftime("%a %b %e %H:%M:%S %Y", t)),
            'x' => out.push_str(&strftime("%m/%d/%y", t)),
            'X' => out.push_str(&strftime("%H:%M:%S", t)),
            // A naive datetime has no zone: Python prints nothing for these.
            'z' | 'Z' => {}
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let t = CivilTime::from_unix(0, 0);
        assert_eq!(
            (t.year, t.month, t.day, t.weekday, t.day_of_year),
            (1970, 1, 1, 4, 1)
        );
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = CivilTime::from_unix(1_722_000_309, 42);
        assert_eq!(
            (
                t.year,
                t.month,
                t.day,
                t.hour,
                t.minute,
                t.second,
                t.weekday,
                t.day_of_year
            ),
            (2024, 7, 26, 13, 25, 9, 5, 208)
        );
        let t = CivilTime::from_unix(951_782_400, 0); // 2000-02-29
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
    }

    #[test]
    fn formats_like_python() {
        let t = CivilTime::from_unix(1_722_000_309, 42);
        assert_eq!(strftime("%d %b %Y", &t), "26 Jul 2024");
        assert_eq!(
            strftime("%A, %B %-d, %Y %I:%M %p", &t),
            "Friday, July 26, 2024 01:25 PM"
        );
        assert_eq!(
            strftime("%Y-%m-%dT%H:%M:%S.%f%z", &t),
            "2024-07-26T13:25:09.000042"
        );
        assert_eq!(strftime("%j %U %W %w %u %e %%", &t), "208 29 30 5 5 26 %");
        assert_eq!(strftime("%Q %", &t), "%Q %");
    }
}
