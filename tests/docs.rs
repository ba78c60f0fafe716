//! The documentation as a reader meets it: README.md and docs/ (also the site `scripts/docs`
//! builds from docs/). Links and anchors resolve, every page is in the site's table of contents,
//! every command block names the test that runs it, the diagrams are rendered from their current
//! sources, and mdBook builds the site. None of it needs a cluster.

mod doc_commands;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use doc_commands::{Block, Marker};
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// How docs/ pages link files outside docs/: the site holds only docs/, so a relative link out of
/// it would break there.
const BLOB: &str = "https://github.com/kmsgrant/kmsgrant-operator/blob/main/";
const TREE: &str = "https://github.com/kmsgrant/kmsgrant-operator/tree/main/";

fn repo() -> &'static Path {
    Path::new(REPO)
}

/// README.md and every Markdown file under docs/, relative to the repository.
fn pages() -> Vec<String> {
    let mut found = vec!["README.md".to_owned()];
    let mut dirs = vec![repo().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                let relative = path.strip_prefix(repo()).unwrap();
                found.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// The anchor GitHub (and mdBook) give a heading: lower case, letters, digits, `-` and `_` kept,
/// spaces made `-`, everything else dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// A page's links (with their line) and the anchors of its headings (a repeated heading gets
/// `-1`, `-2`, ... as on GitHub).
struct Page {
    links: Vec<(usize, String)>,
    anchors: BTreeSet<String>,
}

fn parse(relative: &str) -> Page {
    let text = read(relative);
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut links = Vec::new();
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut heading: Option<String> = None;
    for (event, range) in Parser::new_ext(&text, Options::ENABLE_TABLES).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let count = seen.entry(base.clone()).or_insert(0);
                anchors.insert(match *count {
                    0 => base.clone(),
                    n => format!("{base}-{n}"),
                });
                *count += 1;
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                links.push((line_of(range.start), dest_url.into_string()));
            }
            _ => {}
        }
    }
    Page { links, anchors }
}

/// Joins `target` to the directory of `page` without touching the file system.
fn resolve(page: &str, target: &str) -> Option<PathBuf> {
    let mut path = PathBuf::from(page);
    path.pop();
    for part in Path::new(target).components() {
        match part {
            Component::ParentDir => {
                if !path.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => path.push(other),
        }
    }
    Some(path)
}

/// What is wrong with one link of `page`, if anything.
fn check_link(page: &str, target: &str, parsed: &mut BTreeMap<String, Page>) -> Option<String> {
    if target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let resolved = if let Some(local) = path.strip_prefix(BLOB).or(path.strip_prefix(TREE)) {
        PathBuf::from(local.trim_end_matches('/'))
    } else if path.starts_with("http://") || path.starts_with("https://") {
        return None;
    } else if path.is_empty() {
        PathBuf::from(page)
    } else {
        match resolve(page, path) {
            Some(resolved) => resolved,
            None => return Some(format!("{target} leaves the repository")),
        }
    };
    if page.starts_with("docs/")
        && !path.is_empty()
        && !path.starts_with("http")
        && !resolved.starts_with("docs")
    {
        return Some(format!(
            "{target} leaves docs/, which is all the site holds: link {BLOB}{} instead",
            resolved.display()
        ));
    }
    let on_disk = repo().join(&resolved);
    if !on_disk.exists() {
        return Some(format!("{target}: {} does not exist", resolved.display()));
    }
    let anchor = anchor?;
    if resolved.extension().is_none_or(|e| e != "md") {
        return None;
    }
    let key = resolved.to_string_lossy().into_owned();
    let target_page = parsed.entry(key.clone()).or_insert_with(|| parse(&key));
    (!target_page.anchors.contains(anchor)).then(|| {
        format!(
            "{target}: {key} has no heading with anchor #{anchor} (it has: {})",
            target_page
                .anchors
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

#[test]
fn every_link_and_anchor_in_the_readme_and_docs_resolves() {
    let mut parsed: BTreeMap<String, Page> = BTreeMap::new();
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let links = parsed
            .entry(page.clone())
            .or_insert_with(|| parse(&page))
            .links
            .clone();
        for (line, target) in links {
            checked += 1;
            if let Some(problem) = check_link(&page, &target, &mut parsed) {
                broken.push(format!("{page}:{line}: {problem}"));
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} links found: is the parser right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn slugs_are_the_anchors_github_and_mdbook_make() {
    assert_eq!(
        slug("KmsKeyPolicy (cluster-scoped, short name kmskp): grants nobody declared"),
        "kmskeypolicy-cluster-scoped-short-name-kmskp-grants-nobody-declared"
    );
    assert_eq!(
        slug("Upgrading from grants named kmsgrant-<uid>"),
        "upgrading-from-grants-named-kmsgrant-uid"
    );
    assert_eq!(slug("2.1 KmsGrant"), "21-kmsgrant");
    assert_eq!(slug("Runs — by hand"), "runs--by-hand");
}

/// SUMMARY.md is the site's table of contents: a page missing from it is not on the site.
#[test]
fn every_page_in_docs_is_in_the_summary_once() {
    let summary = parse("docs/SUMMARY.md");
    let mut listed = BTreeMap::<String, usize>::new();
    for (_, target) in &summary.links {
        *listed.entry(format!("docs/{target}")).or_default() += 1;
    }
    let twice: Vec<_> = listed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "listed more than once: {twice:?}");
    let missing: Vec<_> = pages()
        .into_iter()
        .filter(|p| p.starts_with("docs/") && p != "docs/SUMMARY.md")
        .filter(|p| !listed.contains_key(p))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/SUMMARY.md, so not on the site: {missing:?}"
    );
}

/// The word a test (or script) that runs a command must contain: the script's name, the
/// subcommand of the operator, kubectl or helm (in a Rust file as a string literal, `"apply"`),
/// or else the program itself.
fn needle(command: &str) -> Option<Needle> {
    let mut words = command
        .split_whitespace()
        .skip_while(|w| *w == "sudo" || (w.contains('=') && !w.starts_with('-')));
    let program = words.next()?;
    if matches!(program, "export" | "cd") {
        return None;
    }
    // The first word that is neither a flag nor the value of one of the global flags.
    let subcommand = |words: &mut dyn Iterator<Item = &str>| {
        while let Some(word) = words.next() {
            if matches!(word, "-n" | "--namespace" | "--kubeconfig" | "--context") {
                words.next();
            } else if !word.starts_with('-') {
                return Some(Needle::Subcommand(word.to_owned()));
            }
        }
        None
    };
    if program == "cargo" {
        let mut after = words.skip_while(|w| *w != "--").skip(1);
        return subcommand(&mut after);
    }
    if program.ends_with("kmsgrant-operator") {
        return subcommand(&mut words);
    }
    if let Some(script) = program.strip_prefix("scripts/") {
        return Some(Needle::Program(script.to_owned()));
    }
    if matches!(program, "kubectl" | "helm") {
        return subcommand(&mut words);
    }
    Some(Needle::Program(program.to_owned()))
}

#[derive(Debug, PartialEq, Eq)]
enum Needle {
    Program(String),
    Subcommand(String),
}

impl Needle {
    /// Whether the source of `file` names it.
    fn found_in(&self, file: &str, source: &str) -> bool {
        match self {
            Needle::Program(word) => source.contains(word.as_str()),
            Needle::Subcommand(word) if file.ends_with(".rs") => {
                source.contains(&format!("\"{word}\""))
            }
            Needle::Subcommand(word) => source
                .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
                .any(|w| w == word),
        }
    }
}

#[test]
fn every_command_block_in_the_docs_names_the_test_that_runs_it() {
    let mut problems = Vec::new();
    let mut not_run = Vec::new();
    let mut run = 0;
    for page in pages() {
        for block in doc_commands::blocks(repo(), &page) {
            match &block.marker {
                Marker::Missing => problems.push(format!(
                    "{}: a ```{} block without <!-- run by tests/FILE.rs::FUNCTION --> or \
                     <!-- not run by the suite: REASON --> on the line above",
                    block.at(),
                    block.info
                )),
                Marker::NotRun(reason) if reason.is_empty() => {
                    problems.push(format!("{}: not run, but no reason given", block.at()))
                }
                Marker::NotRun(reason) => not_run.push(format!("{}: {reason}", block.at())),
                Marker::RunBy { tests, .. } => {
                    run += 1;
                    problems.extend(run_by_problems(&block, tests));
                }
            }
        }
    }
    eprintln!(
        "{run} command blocks run by tests; not run by the suite:\n{}",
        not_run.join("\n")
    );
    assert!(run >= 10, "only {run} blocks run by tests");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn run_by_problems(block: &Block, tests: &[doc_commands::TestRef]) -> Vec<String> {
    let mut problems = Vec::new();
    if tests.is_empty() {
        problems.push(format!("{}: `run by` names no test", block.at()));
    }
    let mut sources = Vec::new();
    for test in tests {
        let Ok(source) = std::fs::read_to_string(repo().join(&test.file)) else {
            problems.push(format!("{}: {} does not exist", block.at(), test.file));
            continue;
        };
        if let Some(function) = &test.function
            && !source.contains(&format!("fn {function}("))
        {
            problems.push(format!(
                "{}: {} has no function {function}",
                block.at(),
                test.file
            ));
        }
        sources.push((test.file.as_str(), source));
    }
    // A test that reads this page's blocks and runs them runs every command in it.
    if sources
        .iter()
        .any(|(_, s)| s.contains(&format!("\"{}\"", block.doc)))
    {
        return problems;
    }
    for command in block.commands() {
        let Some(needle) = needle(&command) else {
            continue;
        };
        if !sources.iter().any(|(file, s)| needle.found_in(file, s)) {
            problems.push(format!(
                "{}: `{command}`: none of {:?} mentions {needle:?}",
                block.at(),
                tests.iter().map(|t| &t.file).collect::<Vec<_>>()
            ));
        }
    }
    problems
}

#[test]
fn command_blocks_and_their_markers_parse_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("page.md"),
        "text\n\n<!-- run by tests/a.rs::one, tests/b.rs::two; only the first line -->\n```sh\n\
         export A=1   # comment\nkubectl apply -f - <<'EOF'\nkind: X\nEOF\nscripts/x up \\\n  --flag\n```\n\n\
         <!-- not run by the suite: needs a cloud -->\n```console\n$ curl x\noutput line\n# sudo y\n```\n\n\
         ```sh\nunmarked\n```\n\n```yaml\nnot: shell\n```\n",
    )
    .unwrap();
    let found = doc_commands::blocks(dir.path(), "page.md");
    assert_eq!(found.len(), 3, "{found:#?}");
    assert_eq!(
        found[0].marker,
        Marker::RunBy {
            tests: vec![
                doc_commands::TestRef {
                    file: "tests/a.rs".into(),
                    function: Some("one".into())
                },
                doc_commands::TestRef {
                    file: "tests/b.rs".into(),
                    function: Some("two".into())
                },
            ],
            note: Some("only the first line".into()),
        }
    );
    assert!(found[0].is_run_by("tests/b.rs", "two"));
    assert_eq!(
        found[0].commands(),
        [
            "export A=1   # comment",
            "kubectl apply -f - <<'EOF'",
            "scripts/x up --flag"
        ]
    );
    assert_eq!(found[1].marker, Marker::NotRun("needs a cloud".into()));
    assert_eq!(found[1].commands(), ["curl x", "sudo y"]);
    assert_eq!(found[2].marker, Marker::Missing);
    assert_eq!(found[2].line, 20);

    let program = |w: &str| Some(Needle::Program(w.to_owned()));
    let subcommand = |w: &str| Some(Needle::Subcommand(w.to_owned()));
    assert_eq!(needle("sudo scripts/node-demo"), program("node-demo"));
    assert_eq!(needle("cargo run --features dev -- dev"), subcommand("dev"));
    assert_eq!(
        needle("kmsgrant-operator migrate -f deploy/"),
        subcommand("migrate")
    );
    assert_eq!(
        needle("kubectl -n kmsgrant-system rollout status x"),
        subcommand("rollout")
    );
    assert_eq!(needle("export KUBECONFIG=x"), None);
    assert_eq!(needle("IAM=https://x curl -X PUT"), program("curl"));
    let apply = Needle::Subcommand("apply".into());
    assert!(apply.found_in("tests/x.rs", r#"kubectl(&["apply", "-f"])"#));
    assert!(!apply.found_in("tests/x.rs", "// apply it"));
    assert!(apply.found_in("scripts/x", "kubectl apply -f -"));
    assert!(!apply.found_in("scripts/x", "kubectl applying"));
}

/// Each committed SVG under docs/diagrams names the SHA-256 of the Graphviz source it was rendered
/// from (scripts/docs writes it): a changed source without a new rendering fails here, without
/// needing Graphviz.
#[test]
fn every_diagram_is_rendered_from_its_current_source() {
    use sha2::{Digest, Sha256};
    let dir = repo().join("docs/diagrams");
    let mut sources = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "dot") {
            continue;
        }
        sources += 1;
        let sum = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
        let svg = path.with_extension("svg");
        let rendered = std::fs::read_to_string(&svg).unwrap_or_else(|_| {
            panic!(
                "{} has no rendering: run scripts/docs diagrams",
                path.display()
            )
        });
        assert!(
            rendered.contains(&format!("source sha256 {sum}")),
            "{} is not rendered from the current {}: run scripts/docs diagrams",
            svg.display(),
            path.display()
        );
        let name = svg.file_name().unwrap().to_string_lossy().into_owned();
        let used = pages()
            .iter()
            .any(|p| read(p).contains(&format!("diagrams/{name})")));
        assert!(used, "{name} is shown on no page");
    }
    assert!(sources >= 3, "only {sources} diagram sources");
}

/// `scripts/docs build`: the site builds with the pinned mdBook (installed once into the cache
/// outside the repository, a few minutes; then well under a second).
#[test]
fn the_docs_site_builds_with_mdbook() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/docs"))
        .arg("build")
        .arg("--dest-dir")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/docs build failed:\n{said}");
    for line in said.lines() {
        assert!(
            !line.contains("WARN") && !line.contains("ERROR"),
            "mdBook warned: {line}\n{said}"
        );
    }
    for page in ["index.html", "getting-started.html", "install.html"] {
        assert!(out_dir.path().join(page).exists(), "no {page}:\n{said}");
    }
    let architecture = std::fs::read_to_string(out_dir.path().join("architecture.html")).unwrap();
    assert!(architecture.contains("diagrams/architecture.svg"));
    assert!(out_dir.path().join("diagrams/architecture.svg").exists());
}

/// docs/cli.md lists every flag of `run` with its variable, so the reference cannot fall behind
/// the binary.
#[test]
fn every_flag_of_run_is_in_the_flag_reference() {
    let help = Command::new(env!("CARGO_BIN_EXE_kmsgrant-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let reference = read("docs/cli.md");
    let mut missing = Vec::new();
    let mut flags = 0;
    for line in help.lines() {
        let line = line.trim_start();
        let Some(flag) = line
            .strip_prefix("--")
            .map(|rest| rest.split([' ', '=', ',']).next().unwrap_or_default())
        else {
            continue;
        };
        if flag == "help" {
            continue;
        }
        flags += 1;
        if !reference.contains(&format!("`--{flag}")) {
            missing.push(format!("--{flag}"));
        }
    }
    for variable in help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
    {
        if !reference.contains(variable) {
            missing.push(variable.to_owned());
        }
    }
    assert!(flags > 20, "only {flags} flags in run --help:\n{help}");
    assert!(
        missing.is_empty(),
        "not in docs/cli.md: {missing:?}\n(run --help:\n{help})"
    );
}
