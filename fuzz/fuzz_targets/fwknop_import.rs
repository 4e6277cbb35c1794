//! `spad import-fwknop` on arbitrary access.conf / fwknopd.conf text: never panics, and every
//! SOURCE stanza shows up in the output.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (access, conf) = text.split_once('\0').unwrap_or((&text, ""));
    let out = spad::fwknop::import::convert("access.conf", access, Some(("fwknopd.conf", conf)));
    let stanzas = access
        .lines()
        .filter(|l| {
            let w = l.trim().split_whitespace().next().unwrap_or("");
            w.trim_end_matches(':').eq_ignore_ascii_case("SOURCE")
        })
        .count();
    let reported = out
        .lines()
        .filter(|l| l.starts_with("# From access.conf:"))
        .count();
    assert_eq!(reported, stanzas);
});
