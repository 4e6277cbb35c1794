//! One-time sequences (knockd's `one_time_sequences`): a list of sequences, each opening once.
//!
//! The list comes from a file the operator writes (one sequence per line, `#` for comments and
//! for lines knockd or an older spad marked used). Which sequences were used is *not* written
//! back into that file: the daemon keeps it in the state directory (`one-time-used`), keyed by
//! the sequence itself, so the configuration stays read-only and an edited list never reopens a
//! used sequence. This module is pure: parsing, and the list's position.

use std::collections::BTreeSet;

use crate::net::PortProto;

/// Unused lines of a one-time sequence file: (line index, sequence).
pub type OneTimeLines = Vec<(usize, Vec<PortProto>)>;

/// Parses one-time sequence text; returns the sequences of lines not starting with `#` and the
/// 1-based numbers of lines that do not parse. Never panics.
pub fn parse_one_time(text: &str) -> (OneTimeLines, Vec<usize>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let seq: Result<Vec<PortProto>, _> = line
            .split([',', ' ', '\t'])
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect();
        match seq {
            Ok(seq) if (2..=64).contains(&seq.len()) => out.push((i, seq)),
            _ => bad.push(i + 1),
        }
    }
    (out, bad)
}

/// The canonical text of a sequence, as recorded in the state directory: `7100/tcp,7200/udp`.
pub fn canonical(seq: &[PortProto]) -> String {
    seq.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One door's one-time list as the engine follows it.
#[derive(Debug, Clone, Default)]
pub struct OneTimeList {
    sequences: Vec<Vec<PortProto>>,
    used: BTreeSet<String>,
    next: usize,
}

impl OneTimeList {
    /// The list from the file's lines, skipping sequences recorded as used.
    pub fn new(lines: OneTimeLines, used: BTreeSet<String>) -> Self {
        let mut list = Self {
            sequences: lines.into_iter().map(|(_, s)| s).collect(),
            used,
            next: 0,
        };
        list.skip_used();
        list
    }

    fn skip_used(&mut self) {
        while self
            .sequences
            .get(self.next)
            .is_some_and(|s| self.used.contains(&canonical(s)))
        {
            self.next += 1;
        }
    }

    /// The sequence that opens the door now, if any is left.
    pub fn current(&self) -> Option<&[PortProto]> {
        self.sequences.get(self.next).map(Vec::as_slice)
    }

    /// Marks the current sequence used; returns its canonical text (to persist).
    pub fn consume(&mut self) -> Option<String> {
        let text = canonical(self.current()?);
        self.used.insert(text.clone());
        self.next += 1;
        self.skip_used();
        Some(text)
    }

    /// Distinct sequences left.
    pub fn left(&self) -> usize {
        self.sequences[self.next.min(self.sequences.len())..]
            .iter()
            .map(|s| canonical(s))
            .filter(|s| !self.used.contains(s))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Every port of every sequence still in the list (for the door's watched range).
    pub fn ports(&self) -> impl Iterator<Item = PortProto> + '_ {
        self.sequences[self.next.min(self.sequences.len())..]
            .iter()
            .flatten()
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_sequences_are_skipped_wherever_they_are() {
        let (lines, bad) =
            parse_one_time("7100,7200\n#7300,7400\nnope\n7500:udp 7600\n7100,7200\n");
        assert_eq!(bad, [3]);
        let used = BTreeSet::from(["7500/udp,7600/tcp".to_string()]);
        let mut list = OneTimeList::new(lines, used);
        assert_eq!(list.left(), 1);
        assert_eq!(list.consume().as_deref(), Some("7100/tcp,7200/tcp"));
        assert_eq!(
            list.current(),
            None,
            "the repeated line was that same sequence"
        );
        assert_eq!(list.consume(), None);
        assert_eq!(list.left(), 0);
    }
}
