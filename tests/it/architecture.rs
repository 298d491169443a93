//! The modules as layers (docs/architecture.md): a module may use only
//! modules on lower layers. Read from the source's own `crate::` paths, so
//! an import that runs upward — or sideways, between two modules of one
//! layer — fails here, naming the file and the line.

use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and its layer, lowest first. A module
/// uses only modules of a lower layer. Changing a module's layer is a
/// design change: change docs/architecture.md with it.
const LAYERS: &[(&str, u8)] = &[
    // 0: the ids every other module may use.
    ("ids", 0),
    ("scope", 0),
    // 1: leaves — plain types and helpers.
    ("domain", 1),
    ("stored_enums", 1),
    ("instance", 1),
    ("metrics", 1),
    ("redact", 1),
    ("schedule", 1),
    ("template", 1),
    // 2: settings and the state database.
    ("config", 2),
    ("state", 2),
    // 3: process plumbing and HTTP.
    ("lock", 3),
    ("cli", 3),
    ("remote", 3),
    ("telemetry", 3),
    // 4: the two clients, and what reads the state database for people.
    ("crm", 4),
    ("edm", 4),
    ("status", 4),
    ("audit", 4),
    ("ops_endpoint", 4),
    // 5: what both jobs share; the sandbox servers.
    ("jobs", 5),
    ("sandbox", 5),
    // 6: the jobs, and the commands built on one of them.
    ("sync", 6),
    ("writeback", 6),
    ("explain", 6),
    ("reconcile", 6),
    ("forget", 6),
    ("purge", 6),
    ("topup", 6),
    ("reload", 6),
    // 7: commands that run jobs.
    ("once", 7),
    ("demo", 7),
    ("check", 7),
    // 8, 9: the daemon, and the dispatch of every command.
    ("daemon", 8),
    ("app", 9),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level module a source file belongs to (`src/sync/plan.rs` →
/// `sync`); `None` for the binaries and `lib.rs`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!["main", "lib", "bin"].contains(&name.as_str())).then_some(name)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of `text` before its test module (tests may use anything).
fn production_part(text: &str) -> &str {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let starts_tests = line.trim_start().starts_with("#[cfg(")
            && line.contains("test")
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod "));
        if starts_tests {
            let end: usize = lines[..i].iter().map(|l| l.len() + 1).sum();
            return &text[..end.min(text.len())];
        }
    }
    text
}

/// Every `crate::NAME` a line of code (not a comment) names, with its
/// line number.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            if before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue; // `foo_crate::…`
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
        }
    }
    found
}

#[test]
fn every_module_uses_only_modules_of_lower_layers() {
    // Arrange
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();

    // Act: every production `crate::` path, against the table.
    let mut wrong = Vec::new();
    let mut unlisted = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            unlisted.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, used) in crate_paths(production_part(&text)) {
            if used == module {
                continue;
            }
            match layer(&used) {
                Some(theirs) if theirs < own => {}
                Some(theirs) => wrong.push(format!(
                    "{}:{line}: {module} (layer {own}) uses {used} (layer {theirs})",
                    file.strip_prefix(&src).unwrap().display()
                )),
                None => unlisted.push(used),
            }
        }
    }

    // Assert
    unlisted.sort();
    unlisted.dedup();
    assert!(
        unlisted.is_empty(),
        "modules missing from LAYERS: {unlisted:?}"
    );
    assert!(
        wrong.is_empty(),
        "imports that do not run down:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_layer_table_is_the_one_the_architecture_document_shows() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    for (module, layer) in LAYERS {
        let row = format!("| {layer} | ");
        let listed = doc
            .lines()
            .filter(|l| l.starts_with(&row))
            .any(|l| l.contains(&format!("`{module}`")));
        assert!(
            listed,
            "docs/architecture.md lacks `{module}` on layer {layer}"
        );
    }
}

/// The longest a function outside tests may be: a reader holds it whole.
/// A dispatch whose every arm is one call is the only reason to exceed it,
/// and none does today.
const MAX_FUNCTION_LINES: usize = 80;

/// `code` with comments and string and char literals blanked (newlines
/// kept), so that braces inside them do not count.
fn blank_literals(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let blank = |out: &mut String, run: &[char]| {
        out.extend(run.iter().map(|c| if *c == '\n' { '\n' } else { ' ' }))
    };
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        let starts = |s: &str| rest.iter().take(s.len()).copied().eq(s.chars());
        let end = if starts("//") {
            rest.iter().position(|c| *c == '\n').unwrap_or(rest.len())
        } else if starts("/*") {
            find(rest, 2, "*/").map_or(rest.len(), |e| e + 2)
        } else if starts("r#\"") || starts("r\"") {
            let hashes = rest[1..].iter().take_while(|c| **c == '#').count();
            let close: String = std::iter::once('"')
                .chain("#".repeat(hashes).chars())
                .collect();
            find(rest, 2 + hashes, &close).map_or(rest.len(), |e| e + close.len())
        } else if rest[0] == '"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != '"' {
                j += if rest[j] == '\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if rest[0] == '\'' && rest.get(2) == Some(&'\'') {
            3
        } else if rest[0] == '\'' && rest.get(1) == Some(&'\\') {
            find(rest, 2, "'").map_or(1, |e| e + 1)
        } else {
            out.push(rest[0]);
            i += 1;
            continue;
        };
        let prefixed = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if rest[0] == 'r' && prefixed {
            out.push('r');
            i += 1;
            continue;
        }
        blank(&mut out, &rest[..end]);
        i += end;
    }
    out
}

fn find(hay: &[char], from: usize, needle: &str) -> Option<usize> {
    let needle: Vec<char> = needle.chars().collect();
    (from..hay.len().saturating_sub(needle.len() - 1)).find(|&k| hay[k..].starts_with(&needle))
}

/// The byte index of the `}` closing the `{` at `open`.
fn closing_brace(code: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (k, b) in code.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// Every function with a body in `code` (literals blanked, test module cut
/// off) that is longer than the limit: `(name, first line, lines)`.
fn long_functions(code: &str) -> Vec<(String, usize, usize)> {
    let bytes = code.as_bytes();
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(hit) = code[at..].find("fn ") {
        let start = at + hit;
        at = start + 3;
        let word_start =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !word_start {
            continue;
        }
        let name: String = code[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body: the first `{` outside (), <> and [] before any `;`.
        let mut depth = 0i32;
        let mut body = None;
        for (k, b) in bytes.iter().enumerate().skip(at) {
            match b {
                b'(' | b'<' | b'[' => depth += 1,
                b')' | b'>' | b']' => depth -= 1,
                b';' if depth <= 0 => break,
                b'{' if depth <= 0 => {
                    body = Some(k);
                    break;
                }
                _ => {}
            }
        }
        let Some(open) = body else { continue };
        let lines = line_of(closing_brace(bytes, open)) - line_of(start) + 1;
        if lines > MAX_FUNCTION_LINES {
            found.push((name, line_of(start), lines));
        }
    }
    found
}

#[test]
fn no_function_outside_tests_is_longer_than_80_lines() {
    // Arrange
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();

    // Act
    let mut long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let code = blank_literals(production_part(&text));
        for (name, line, lines) in long_functions(&code) {
            let shown = file.strip_prefix(&src).unwrap().display();
            long.push(format!("{shown}:{line}: {name} has {lines} lines"));
        }
    }

    // Assert
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_check_sees_a_long_function_and_not_braces_in_strings() {
    let body = "    let x = 1;\n".repeat(MAX_FUNCTION_LINES);
    let long = format!("fn long() {{\n{body}}}\nfn short() {{ let s = \"}}}}\"; }}\n");
    let code = blank_literals(&long);

    let found = long_functions(&code);

    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "long");
    assert_eq!(found[0].2, MAX_FUNCTION_LINES + 2);
}
