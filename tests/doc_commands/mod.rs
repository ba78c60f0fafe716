//! The commands the docs tell a reader to run, and the tests that run them.
//!
//! A fenced block marked `sh` or `console` in README.md or docs/ is a block of commands for the
//! reader. The line right above it says who runs it:
//!
//! ```text
//! <!-- run by tests/dev_sandbox.rs::a_test_function[, tests/other.rs::another]; optional note -->
//! <!-- not run by the suite: why not -->
//! ```
//!
//! tests/docs.rs checks every block has one and that each named test exists and uses the
//! commands' programs; tests that execute the docs (tests/dev_sandbox.rs) read their blocks here.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::path::Path;

/// Where a block's marker says it is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    RunBy {
        tests: Vec<TestRef>,
        note: Option<String>,
    },
    NotRun(String),
    /// No marker, or a comment above the block that is not one.
    Missing,
}

/// `tests/FILE.rs::function` (or a file alone, for a script such as `.ci/run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRef {
    pub file: String,
    pub function: Option<String>,
}

/// A shell block of a Markdown file.
#[derive(Debug, Clone)]
pub struct Block {
    /// The file, relative to the repository.
    pub doc: String,
    /// 1-based line of the opening fence.
    pub line: usize,
    /// `sh` or `console`.
    pub info: String,
    pub marker: Marker,
    /// The lines between the fences.
    pub text: String,
}

impl Block {
    pub fn at(&self) -> String {
        format!("{}:{}", self.doc, self.line)
    }

    /// Whether the marker names `file::function`.
    pub fn is_run_by(&self, file: &str, function: &str) -> bool {
        match &self.marker {
            Marker::RunBy { tests, .. } => tests
                .iter()
                .any(|t| t.file == file && t.function.as_deref() == Some(function)),
            _ => false,
        }
    }

    /// The commands of the block, one per entry: continuation lines joined, comments and
    /// here-document bodies left out; in a `console` block only the lines after a `$ ` or `# `
    /// prompt (the rest is output).
    pub fn commands(&self) -> Vec<String> {
        let mut commands = Vec::new();
        let mut current: Option<String> = None;
        let mut heredoc: Option<String> = None;
        for raw in self.text.lines() {
            if let Some(end) = &heredoc {
                if raw.trim() == end {
                    heredoc = None;
                }
                continue;
            }
            let line = match current.take() {
                Some(mut joined) => {
                    joined.push(' ');
                    joined.push_str(raw.trim());
                    joined
                }
                None => {
                    let trimmed = raw.trim();
                    let command = if self.info == "console" {
                        match trimmed
                            .strip_prefix("$ ")
                            .or_else(|| trimmed.strip_prefix("# "))
                        {
                            Some(command) => command.trim().to_owned(),
                            None => continue,
                        }
                    } else {
                        trimmed.to_owned()
                    };
                    if command.is_empty() || command.starts_with('#') {
                        continue;
                    }
                    command
                }
            };
            if let Some(stripped) = line.strip_suffix('\\') {
                current = Some(stripped.trim_end().to_owned());
                continue;
            }
            if let Some(at) = line.find("<<") {
                let word = line[at + 2..]
                    .trim_start_matches('-')
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches(|c| c == '\'' || c == '"');
                if !word.is_empty() {
                    heredoc = Some(word.to_owned());
                }
            }
            commands.push(line);
        }
        if let Some(rest) = current {
            commands.push(rest);
        }
        commands
    }
}

/// The shell blocks (`sh`, `console`) of the Markdown file `doc` (relative to `repo`).
pub fn blocks(repo: &Path, doc: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(repo.join(doc))
        .unwrap_or_else(|e| panic!("cannot read {doc}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let Some(fence) = fence_of(line) else {
            i += 1;
            continue;
        };
        let info = line.trim_start()[fence.len()..].trim().to_owned();
        let start = i;
        i += 1;
        let mut body = Vec::new();
        while i < lines.len() && !lines[i].trim_start().starts_with(&fence) {
            body.push(lines[i]);
            i += 1;
        }
        i += 1;
        if info == "sh" || info == "console" {
            let marker = match start.checked_sub(1).map(|above| lines[above].trim()) {
                Some(above) => parse_marker(above),
                None => Marker::Missing,
            };
            found.push(Block {
                doc: doc.to_owned(),
                line: start + 1,
                info,
                marker,
                text: body.join("\n"),
            });
        }
    }
    found
}

/// The fence a line opens (three or more backticks, possibly indented in a list), if any.
fn fence_of(line: &str) -> Option<String> {
    let trimmed = line.trim_start();
    let ticks = trimmed.chars().take_while(|&c| c == '`').count();
    (ticks >= 3).then(|| "`".repeat(ticks))
}

fn parse_marker(line: &str) -> Marker {
    let Some(inner) = line
        .strip_prefix("<!--")
        .and_then(|rest| rest.strip_suffix("-->"))
        .map(str::trim)
    else {
        return Marker::Missing;
    };
    if let Some(reason) = inner.strip_prefix("not run by the suite") {
        let reason = reason.trim_start_matches(|c: char| c == ':' || c.is_whitespace());
        return Marker::NotRun(reason.trim().to_owned());
    }
    let Some(refs) = inner.strip_prefix("run by ") else {
        return Marker::Missing;
    };
    let (refs, note) = match refs.split_once(';') {
        Some((refs, note)) => (refs, Some(note.trim().to_owned())),
        None => (refs, None),
    };
    let tests = refs
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once("::") {
            Some((file, function)) => TestRef {
                file: file.to_owned(),
                function: Some(function.to_owned()),
            },
            None => TestRef {
                file: r.to_owned(),
                function: None,
            },
        })
        .collect();
    Marker::RunBy { tests, note }
}
