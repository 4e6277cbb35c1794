//! Bounds on the knock sections (`[doors.*]`, `[totp-doors.*]`, `[knocking]`) that
//! `crate::knock::config` builds: values it would silently clamp or that would break a door.
//!
//! It reads its own spanned view of the same text, so each refusal points at the value.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::limits::name_problem;
use super::span::{at, Located, Seconds};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct View {
    #[serde(default)]
    doors: BTreeMap<String, Spanned<DoorView>>,
    #[serde(default)]
    totp_doors: BTreeMap<String, Spanned<DoorView>>,
    #[serde(default)]
    knocking: KnockingView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DoorView {
    seq_timeout: Option<Spanned<Seconds>>,
    skew_steps: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KnockingView {
    max_knocks_per_second: Option<Spanned<u32>>,
    blacklist_after: Option<Spanned<u32>>,
}

/// Refuses door names that do not fit a kernel comment, a zero `seq-timeout`, `skew-steps`
/// over 3, and a zero `max-knocks-per-second` or `blacklist-after`.
pub(super) fn check(text: &str) -> Result<(), Located> {
    // The full parse has already accepted this text, so the view parses too.
    let view: View = toml::from_str(text).map_err(|e| Located {
        span: e.span().unwrap_or(0..0),
        message: e.message().trim().to_string(),
    })?;
    for (name, door) in view.doors.iter().chain(&view.totp_doors) {
        check_door(name, door)?;
    }
    let positive = [
        (&view.knocking.max_knocks_per_second, "max-knocks-per-second = 0 ignores every knock and counts each as a failure; write a rate such as 20 (the default)"),
        (&view.knocking.blacklist_after, "blacklist-after = 0 would blacklist a source before its first knock; write 3 (the default) or more"),
    ];
    for (value, message) in positive {
        if let Some(zero) = value.as_ref().filter(|v| *v.get_ref() == 0) {
            return Err(at(zero, message));
        }
    }
    Ok(())
}

fn check_door(name: &str, door: &Spanned<DoorView>) -> Result<(), Located> {
    if let Some(problem) = name_problem(name) {
        return Err(at(door, format!("door {problem}")));
    }
    let door_view = door.get_ref();
    if let Some(zero) = door_view
        .seq_timeout
        .as_ref()
        .filter(|t| t.get_ref().0.is_zero())
    {
        return Err(at(
            zero,
            "seq-timeout = 0 leaves no time for a sequence, so the door never opens; write e.g. \"15s\" (the default)",
        ));
    }
    if let Some(skew) = door_view.skew_steps.as_ref().filter(|s| *s.get_ref() > 3) {
        return Err(at(
            skew,
            "skew-steps is at most 3 (each step is 30 s either side); write 1 (the default)",
        ));
    }
    Ok(())
}
