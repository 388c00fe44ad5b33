//! `strftime_now(format)`, the date function transformers gives chat templates (Llama 3 and
//! Mistral templates write today's date into their system message), for the UTC clock: the
//! directives of Python's `strftime` that such templates use, without a date-time crate.

use anyhow::{bail, Result};
use std::time::{SystemTime, UNIX_EPOCH};

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
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A UTC date and time of day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to 31.
    pub day: u32,
    /// 0 (Monday) to 6 (Sunday), as Python's `weekday()`.
    pub weekday: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday (3).
            weekday: (days + 3).rem_euclid(7) as u32,
            hour: (rest / 3600) as u32,
            minute: (rest % 3600 / 60) as u32,
            second: (rest % 60) as u32,
        }
    }

    pub fn now() -> Self {
        let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(before) => -(before.duration().as_secs() as i64),
        };
        Self::from_unix(secs)
    }

    /// Today's date (UTC) at 00:00:00.
    pub fn today() -> Self {
        let now = Self::now();
        DateTime {
            hour: 0,
            minute: 0,
            second: 0,
            ..now
        }
    }

    /// The date as `YYYY-MM-DD`, what [`DateTime::parse_date`] reads.
    pub fn ymd(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `YYYY-MM-DD` at 00:00:00 UTC.
    pub fn parse_date(text: &str) -> Result<Self> {
        let parts: Vec<&str> = text.split('-').collect();
        let number = |s: &str| s.parse::<i64>().ok().filter(|_| !s.starts_with('+'));
        let date = match parts[..] {
            [y, m, d] if y.len() == 4 && m.len() == 2 && d.len() == 2 => {
                number(y).zip(number(m)).zip(number(d))
            }
            _ => None,
        };
        let Some(((year, month), day)) =
            date.filter(|&((_, m), d)| (1..=12).contains(&m) && (1..=31).contains(&d))
        else {
            bail!("expected a date as YYYY-MM-DD, found {text:?}");
        };
        let parsed = Self::from_unix(days_from_civil(year, month, day) * 86_400);
        // A day past its month's end (2023-02-29) comes back as another date.
        if (parsed.year, i64::from(parsed.month), i64::from(parsed.day)) != (year, month, day) {
            bail!("{text:?} is not a date: that month has no day {day}");
        }
        Ok(parsed)
    }

    /// The time written as Python's `strftime` writes it, for the directives `%d %m %Y %y
    /// %H %M %S %b %B %a %A %%`; any other is an error.
    pub fn format(&self, format: &str) -> Result<String> {
        let mut out = String::new();
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let Some(directive) = chars.next() else {
                bail!("strftime format {format:?} ends with a lone %");
            };
            let month = MONTHS[self.month as usize - 1];
            let weekday = WEEKDAYS[self.weekday as usize];
            match directive {
                'd' => out.push_str(&format!("{:02}", self.day)),
                'm' => out.push_str(&format!("{:02}", self.month)),
                'Y' => out.push_str(&self.year.to_string()),
                'y' => out.push_str(&format!("{:02}", self.year.rem_euclid(100))),
                'H' => out.push_str(&format!("{:02}", self.hour)),
                'M' => out.push_str(&format!("{:02}", self.minute)),
                'S' => out.push_str(&format!("{:02}", self.second)),
                'b' => out.push_str(&month[..3]),
                'B' => out.push_str(month),
                'a' => out.push_str(&weekday[..3]),
                'A' => out.push_str(weekday),
                '%' => out.push('%'),
                other => bail!(
                    "strftime format {format:?}: %{other} is not supported (supported: %d %m \
                     %Y %y %H %M %S %b %B %a %A %%)"
                ),
            }
        }
        Ok(out)
    }
}

/// The day count from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; the
/// inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (H. Hinnant's algorithm).
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
