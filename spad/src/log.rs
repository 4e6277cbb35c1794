//! One line per decision on stderr (journald adds its own metadata), with a UTC timestamp.
//! Refusals are rate-limited so a flood of garbage cannot flood the log.
//!
//! When stderr is the journal (`$JOURNAL_STREAM` names stderr's device and inode), each line
//! starts with a syslog priority prefix, `<3>` for errors, `<4>` for warnings and `<6>` for the
//! rest, so `journalctl -p warning` shows exactly the errors and warnings.

use std::io::Write;

use spa_shared::Micros;

/// Formats microseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn timestamp(micros: Micros) -> String {
    let secs = micros / 1_000_000;
    let millis = (micros / 1000) % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Writes log lines; refusal lines go through a per-second budget.
#[derive(Debug)]
pub struct Logger {
    second: u64,
    refusals_this_second: u32,
    suppressed: u64,
    pub refusals_per_second: u32,
    /// Whether lines get journald priority prefixes.
    pub journal: bool,
    /// Lines held for [`Logger::flush`] while [`Logger::hold_lines`] is on.
    held: String,
    holding: bool,
    /// Tests: what would have gone to stderr, and in how many writes.
    #[cfg(test)]
    captured: Option<(Vec<u8>, usize)>,
}

/// Held lines are written at once beyond this many bytes, whatever the loop is doing.
const HELD_AT_MOST: usize = 64 * 1024;

/// Whether stderr is connected to the journal: `$JOURNAL_STREAM` is `DEVICE:INODE` of it.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    value == format!("{}:{}", meta.dev(), meta.ino())
}

/// The syslog priority of a line: errors 3, warnings 4, everything else 6 (info).
pub fn priority(message: &str) -> u8 {
    if message.starts_with("error") || message.contains(": error:") {
        3
    } else if message.starts_with("warning") || message.contains(": warning:") {
        4
    } else {
        6
    }
}

/// A whole log line as written to stderr.
pub fn format_line(now: Micros, message: &str, journal: bool) -> String {
    if journal {
        format!("<{}>{} spad: {message}", priority(message), timestamp(now))
    } else {
        format!("{} spad: {message}", timestamp(now))
    }
}

impl Default for Logger {
    fn default() -> Self {
        Self {
            second: 0,
            refusals_this_second: 0,
            suppressed: 0,
            refusals_per_second: 50,
            journal: stderr_is_journal(),
            held: String::new(),
            holding: false,
            #[cfg(test)]
            captured: None,
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Logger {
    /// Writes one line with a single `write` (stderr is unbuffered: `writeln!` made two, the
    /// text and then its newline, and a reader of a pipe could see them apart). While lines
    /// are held, it is appended to the others instead.
    pub fn line(&mut self, now: Micros, message: &str) {
        if self.holding {
            self.held.push_str(&format_line(now, message, self.journal));
            self.held.push('\n');
            if self.held.len() >= HELD_AT_MOST {
                self.flush();
            }
            return;
        }
        let mut line = format_line(now, message, self.journal);
        line.push('\n');
        self.write_out(line.as_bytes());
    }

    fn write_out(&mut self, bytes: &[u8]) {
        #[cfg(test)]
        if let Some((out, writes)) = &mut self.captured {
            out.extend_from_slice(bytes);
            *writes += 1;
            return;
        }
        let _ = std::io::stderr().lock().write_all(bytes);
    }

    /// From now on, lines wait for [`Logger::flush`] and go out together in one `write`: the
    /// event loop flushes once per turn, so a batch of grants costs one system call on the
    /// packet path instead of one per grant. Whole lines only, in order; dropping the logger
    /// flushes too.
    pub fn hold_lines(&mut self, hold: bool) {
        self.holding = hold;
        if !hold {
            self.flush();
        }
    }

    /// Writes the held lines, if any.
    pub fn flush(&mut self) {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.write_out(held.as_bytes());
            self.held = held;
            self.held.clear();
            if self.held.capacity() > HELD_AT_MOST {
                self.held.shrink_to(HELD_AT_MOST);
            }
        }
    }

    /// The held lines (tests).
    #[cfg(test)]
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Logs a refusal unless this second's budget is spent.
    pub fn refusal(&mut self, now: Micros, message: &str) {
        self.refusal_with(now, || message.to_string());
    }

    /// Like [`refusal`](Self::refusal), but the message is only built if it will be written:
    /// a flood of refusals costs no formatting.
    pub fn refusal_with(&mut self, now: Micros, message: impl FnOnce() -> String) {
        let second = now / 1_000_000;
        if second != self.second {
            if self.suppressed > 0 {
                let note = format!(
                    "suppressed {} refusal lines in the last second(s)",
                    self.suppressed
                );
                self.suppressed = 0;
                self.line(now, &note);
            }
            self.second = second;
            self.refusals_this_second = 0;
        }
        if self.refusals_this_second < self.refusals_per_second {
            self.refusals_this_second += 1;
            self.line(now, &message());
        } else {
            self.suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_lines_wait_for_the_flush_whole_and_in_order() {
        let mut log = Logger::default();
        log.journal = false;
        log.captured = Some((Vec::new(), 0));
        let written = |log: &Logger| {
            let (out, writes) = log.captured.as_ref().unwrap();
            (String::from_utf8(out.clone()).unwrap(), *writes)
        };
        log.line(0, "at once");
        assert_eq!(written(&log).1, 1);
        log.hold_lines(true);
        log.line(0, "granted one");
        log.line(1_000, "granted two");
        assert_eq!(written(&log).1, 1, "held lines wait");
        log.flush();
        assert_eq!(
            written(&log),
            (
                "1970-01-01T00:00:00.000Z spad: at once\n\
                 1970-01-01T00:00:00.000Z spad: granted one\n\
                 1970-01-01T00:00:00.001Z spad: granted two\n"
                    .to_string(),
                2
            ),
            "both lines in one write, in order"
        );
        log.flush();
        assert_eq!(written(&log).1, 2, "nothing held, nothing written");
        // A flood of lines goes out before the buffer passes its bound, whole lines only.
        for _ in 0..2_000 {
            log.line(0, "refused from=192.0.2.1 reason=\"mac1\"");
        }
        assert!(log.held().len() < HELD_AT_MOST);
        let (out, writes) = written(&log);
        assert!(writes > 2 && out.ends_with('\n'));
        log.hold_lines(false);
        assert_eq!(log.held(), "");
        assert_eq!(written(&log).0.lines().count(), 2_003);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_763_726_400_123_000), "2025-11-21T12:00:00.123Z");
        assert_eq!(timestamp(951_782_400_000_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn journal_lines_carry_the_priority() {
        assert_eq!(
            format_line(0, "error: capture: gone", true),
            "<3>1970-01-01T00:00:00.000Z spad: error: capture: gone"
        );
        assert!(format_line(0, "warning: replay record damaged", true).starts_with("<4>"));
        assert!(format_line(0, "granted owner=alice", true).starts_with("<6>"));
        assert!(format_line(0, "203.0.113.9: door ops: error: x", true).starts_with("<3>"));
        assert_eq!(
            format_line(0, "error: x", false),
            "1970-01-01T00:00:00.000Z spad: error: x"
        );
    }
}
