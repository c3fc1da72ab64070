//! Architecture rules that a reading of the sources can check (ARCHITECTURE.md):
//! - eager code reaches the tracer only through the seam (`src/trace_seam.rs`), so nothing
//!   under src/tensor.rs, src/autograd.rs, src/ops.rs or src/nn/ names `crate::compile`;
//! - the IR's petgraph handle stays inside `compiler/src/graph.rs`;
//! - functions in the compiler and the JIT fit on a screen (80 lines), except the per-op
//!   tables.
//!
//! The scanner is deliberately small: comments and literals are blanked out, then braces are
//! counted. It needs no parser because the rules are about the shape of the text.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The longest a function in compiler/src or jit/src may be, in lines (signature to closing brace).
const MAX_FN_LINES: usize = 80;

/// Every `.rs` file under `dir` (relative to the repository root), sorted.
fn rust_files(dir: &str) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.to_path_buf());
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(ROOT).join(dir), &mut out);
    out
}

/// The path relative to the repository root, with `/` separators.
fn rel(p: &Path) -> String {
    p.strip_prefix(ROOT).unwrap_or(p).to_string_lossy().replace('\\', "/")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `src` with comments, string literals and char literals replaced by spaces (newlines kept,
/// so line numbers stay right). Lifetimes (`'a`) are kept.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            loop {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if let Some(len) = raw_string_len(&c[i..]) {
            for &ch in &c[i..i + len] {
                blank(&mut out, ch);
            }
            i += len;
        } else if c[i] == '"' {
            blank(&mut out, c[i]);
            i += 1;
            while c[i] != '"' {
                let n = if c[i] == '\\' { 2 } else { 1 };
                for &ch in &c[i..i + n] {
                    blank(&mut out, ch);
                }
                i += n;
            }
            blank(&mut out, c[i]);
            i += 1;
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\''); otherwise a lifetime, kept as is.
            let start = i;
            i += if next == Some('\\') { 3 } else { 2 };
            while c[i] != '\'' {
                i += 1;
            }
            i += 1;
            for &ch in &c[start..i] {
                blank(&mut out, ch);
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The length of a raw string literal (`r"…"`, `r#"…"#`, `br"…"`) starting at `c[0]`, if one does.
fn raw_string_len(c: &[char]) -> Option<usize> {
    let mut i = usize::from(c.first() == Some(&'b'));
    if c.get(i) != Some(&'r') {
        return None;
    }
    i += 1;
    let hashes = c[i..].iter().take_while(|&&ch| ch == '#').count();
    i += hashes;
    if c.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    loop {
        if c[i] == '"' && c[i + 1..].iter().take(hashes).filter(|&&ch| ch == '#').count() == hashes {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// A function with a body: its name, the line of its `fn` keyword and its length in lines.
struct FnSpan {
    name: String,
    line: usize,
    lines: usize,
}

/// Every function with a body in `code` (as given by [`code_only`]), nested ones included.
fn functions(code: &str) -> Vec<FnSpan> {
    let c: Vec<char> = code.chars().collect();
    let line_at = |i: usize| c[..i].iter().filter(|&&ch| ch == '\n').count() + 1;
    let mut out = Vec::new();
    for i in 0..c.len() {
        let keyword = c[i..].starts_with(&['f', 'n'])
            && (i == 0 || !is_ident(c[i - 1]))
            && c.get(i + 2).is_some_and(|ch| ch.is_whitespace());
        if !keyword {
            continue;
        }
        let mut j = i + 2;
        while c[j].is_whitespace() {
            j += 1;
        }
        let name: String = c[j..].iter().take_while(|&&ch| is_ident(ch)).collect();
        if name.is_empty() {
            continue; // a fn-pointer type
        }
        // The body is the first `{` outside parentheses and brackets; a `;` first means none.
        let mut depth = 0i32;
        let body = loop {
            match c.get(j) {
                None => break None,
                Some('(' | '[') => depth += 1,
                Some(')' | ']') => depth -= 1,
                Some(';') if depth == 0 => break None,
                Some('{') if depth == 0 => break Some(j),
                _ => {}
            }
            j += 1;
        };
        let Some(open) = body else { continue };
        let mut braces = 0;
        let mut k = open;
        loop {
            match c[k] {
                '{' => braces += 1,
                '}' => {
                    braces -= 1;
                    if braces == 0 {
                        break;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        let line = line_at(i);
        out.push(FnSpan { name, line, lines: line_at(k) - line + 1 });
    }
    out
}

#[test]
fn eager_code_does_not_import_the_compiler() {
    let mut files = vec![PathBuf::from(ROOT).join("src/tensor.rs")];
    files.push(PathBuf::from(ROOT).join("src/autograd.rs"));
    files.push(PathBuf::from(ROOT).join("src/ops.rs"));
    files.extend(rust_files("src/nn"));
    assert!(files.len() > 4, "src/nn has files");
    let offenders: Vec<String> = files
        .iter()
        .flat_map(|p| {
            read(p)
                .lines()
                .enumerate()
                .filter(|(_, l)| l.contains("crate::compile"))
                .map(|(n, l)| format!("{}:{}: {}", rel(p), n + 1, l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(offenders.is_empty(), "eager code must reach the tracer through the seam:\n{}", offenders.join("\n"));
}

/// `x.g.` or `x.g[` in code: a use of a field named `g`, which is how `Graph`'s petgraph
/// handle is reached.
fn graph_field_uses(code: &str) -> Vec<usize> {
    let c: Vec<char> = code.chars().collect();
    let mut lines = Vec::new();
    for i in 1..c.len().saturating_sub(2) {
        let before = c[i - 1];
        if c[i] == '.'
            && c[i + 1] == 'g'
            && matches!(c[i + 2], '.' | '[')
            && (is_ident(before) || before == ')' || before == ']')
        {
            lines.push(c[..i].iter().filter(|&&ch| ch == '\n').count() + 1);
        }
    }
    lines
}

#[test]
fn the_graph_handle_stays_in_graph_rs() {
    let this = file!().replace('\\', "/");
    let mut offenders = Vec::new();
    for dir in ["compiler", "jit", "src", "tests", "benches", "examples", "macros", "runtime"] {
        for p in rust_files(dir) {
            let name = rel(&p);
            if name == "compiler/src/graph.rs" || name.ends_with(&this) {
                continue;
            }
            let code = code_only(&read(&p));
            offenders.extend(graph_field_uses(&code).into_iter().map(|l| format!("{name}:{l}")));
        }
    }
    assert!(offenders.is_empty(), "use Graph's accessors, not its petgraph field:\n{}", offenders.join("\n"));
}

/// Functions allowed to be long: the per-op tables.
fn exempt(file: &str, function: &str) -> bool {
    file.starts_with("compiler/src/ops/")
        || file == "jit/src/math.rs"
        || (file == "jit/src/codegen.rs" && function == "apply")
}

#[test]
fn compiler_and_jit_functions_fit_on_a_screen() {
    let mut offenders = Vec::new();
    for dir in ["compiler/src", "jit/src"] {
        for p in rust_files(dir) {
            let name = rel(&p);
            for f in functions(&code_only(&read(&p))) {
                if f.lines > MAX_FN_LINES && !exempt(&name, &f.name) {
                    offenders.push(format!("{name}:{} fn {} ({} lines)", f.line, f.name, f.lines));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "functions over {MAX_FN_LINES} lines:\n{}", offenders.join("\n"));
}

#[test]
fn the_scanner_blanks_comments_and_literals_and_measures_functions() {
    let src = "// fn a() {\nfn b<'a>(x: &'a str) -> char {\n    let _ = \"}\"; let _ = r#\"{\"#;\n    '{'\n}\n\
               trait T { fn c(&self); }\nfn d() { let f: fn(u8) = |_| {}; /* } */ }\n";
    let code = code_only(src);
    assert_eq!(code.lines().count(), src.lines().count());
    let fns: Vec<(String, usize, usize)> = functions(&code).into_iter().map(|f| (f.name, f.line, f.lines)).collect();
    assert_eq!(fns, [("b".to_string(), 2, 4), ("d".to_string(), 7, 1)]);
    let uses = "let t = g.g[n].ty; // e.g. this\nlet s = \"x.g.y\"; foo.gap;\nx.g.node_count();";
    assert_eq!(graph_field_uses(&code_only(uses)), [1, 3]);
}
