//! Keeps the configuration and firewall code in small functions: fails naming every `fn` in
//! those files whose body (from the `fn` line to its closing brace) is longer than
//! [`MAX_LINES`]. Pure file scanning, no root needed.
//!
//! Comments, string literals (raw ones too) and character literals are blanked out before the
//! braces are counted, so a `"{"` in a message does not fool the count.

use std::path::{Path, PathBuf};

/// The longest function allowed in the scanned files, counted from the `fn` line to the line of
/// its closing brace, both included.
const MAX_LINES: usize = 80;

/// Files and directories (relative to the spad crate) under the rule; directories recursively.
const SCOPE: &[&str] = &[
    "src/config",
    "src/knock/config.rs",
    "src/fwknop/config.rs",
    "src/fwknop/import.rs",
    "src/firewall",
];

/// A function found in a source file.
#[derive(Debug, PartialEq, Eq)]
struct Function {
    name: String,
    /// 1-based line of the `fn` keyword.
    line: usize,
    /// Lines from the `fn` line to the closing brace, both included.
    lines: usize,
}

/// `text` with comments, strings and character literals replaced by spaces (newlines kept), so
/// only code braces remain and line numbers do not move.
fn code_only(text: &str) -> Vec<char> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let ident = |c: Option<&char>| c.is_some_and(|c| c.is_alphanumeric() || *c == '_');
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let start = i;
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(end) = raw_string_end(&chars, i)
            .filter(|_| !ident(i.checked_sub(1).and_then(|p| chars.get(p))) || chars[i] == 'b')
        {
            i = end;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
        } else {
            out.push(c);
            i += 1;
            continue;
        }
        let end = i.min(chars.len());
        out.extend(chars[start..end].iter().map(|c| blank(*c)));
        i = end;
    }
    out
}

/// If a raw string (`r"…"`, `r#"…"#`, `br#"…"#`) starts at `i`, the index just past its end.
fn raw_string_end(chars: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|c| **c == '#').count();
    j += hashes;
    if chars.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < chars.len() {
        if chars[j] == '"'
            && chars[j + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(chars.len())
}

/// Every function with a body in `text`, with its length.
fn functions(text: &str) -> Vec<Function> {
    let code = code_only(text);
    let line_at = |index: usize| 1 + code[..index].iter().filter(|c| **c == '\n').count();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut found = Vec::new();
    for i in 0..code.len() {
        let keyword = code[i..].starts_with(&['f', 'n'])
            && (i == 0 || !is_ident(code[i - 1]))
            && code.get(i + 2).is_some_and(|c| c.is_whitespace());
        if !keyword {
            continue;
        }
        let name: String = code[i + 2..]
            .iter()
            .skip_while(|c| c.is_whitespace())
            .take_while(|c| is_ident(**c))
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body's `{`, unless a `;` (a declaration without body) comes first; `;` inside
        // `[u8; 32]` is no end.
        let mut depth = 0i32;
        let mut open = None;
        for (j, c) in code.iter().enumerate().skip(i) {
            match c {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                ';' if depth == 0 => break,
                '{' if depth == 0 => {
                    open = Some(j);
                    break;
                }
                _ => {}
            }
        }
        let Some(open) = open else { continue };
        let mut braces = 0i32;
        let mut close = None;
        for (j, c) in code.iter().enumerate().skip(open) {
            match c {
                '{' => braces += 1,
                '}' => {
                    braces -= 1;
                    if braces == 0 {
                        close = Some(j);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.unwrap_or_else(|| panic!("fn {name}: no closing brace"));
        let line = line_at(i);
        found.push(Function {
            name,
            line,
            lines: line_at(close) - line + 1,
        });
    }
    found
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let entries =
            std::fs::read_dir(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            rust_files(&entry.path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn no_function_in_config_and_firewall_code_is_longer_than_80_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for entry in SCOPE {
        let path = root.join(entry);
        assert!(
            path.exists(),
            "{entry} is gone: point SCOPE at where that code lives now"
        );
        rust_files(&path, &mut files);
    }
    files.sort();
    files.dedup();
    assert!(files.len() >= 10, "scope found too few files: {files:?}");
    let mut too_long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for f in functions(&text) {
            if f.lines > MAX_LINES {
                let shown = file.strip_prefix(root).unwrap_or(file).display();
                too_long.push(format!(
                    "{shown}:{} fn {} is {} lines",
                    f.line, f.name, f.lines
                ));
            }
        }
    }
    assert!(
        too_long.is_empty(),
        "functions over {MAX_LINES} lines (split them into named helpers):\n{}",
        too_long.join("\n")
    );
}

#[test]
fn the_scanner_measures_bodies_and_ignores_braces_in_literals_and_comments() {
    let text = "\
/// fn in_doc() {
fn short() -> [u8; 2] {
    let s = \"}}}\";
    let r = r#\"{ \"# ;
    let c = '{';
    let l: &'static str = \"x\";
    // }
    /* { /* } */ */
    [0; 2]
}

trait T {
    fn declared(&self);
    fn with_default(&self) {}
}

pub(crate) fn outer() {
    fn inner() {
    }
}
";
    let found = functions(text);
    let summary: Vec<(&str, usize, usize)> = found
        .iter()
        .map(|f| (f.name.as_str(), f.line, f.lines))
        .collect();
    assert_eq!(
        summary,
        [
            ("short", 2, 9),
            ("with_default", 14, 1),
            ("outer", 17, 4),
            ("inner", 18, 2)
        ]
    );
    let long = format!("fn long() {{\n{}}}\n", "    step();\n".repeat(MAX_LINES));
    assert_eq!(functions(&long)[0].lines, MAX_LINES + 2);
}
