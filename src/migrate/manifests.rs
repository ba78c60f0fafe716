//! Rewrites `kmsgrant.io/v1alpha1` manifests to `v1beta1` as text, so that every byte but the
//! changed lines stays as it was: comments, key order, indentation, quoting.
//!
//! The text is read line by line, which is how people write manifests; anything it cannot read
//! that way is left for hand editing rather than guessed at. A YAML parser checks each rewrite:
//! the rewritten document must parse to exactly the original document with the new
//! `apiVersion` and without `spec.name`, or the document is left as it was.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde_json::Value;

/// The version manifests are moved from.
pub const FROM: &str = "kmsgrant.io/v1alpha1";
/// The version manifests are moved to.
pub const TO: &str = "kmsgrant.io/v1beta1";
const KINDS: [&str; 3] = ["KmsGrant", "KmsProviderConfig", "KmsKeyPolicy"];

/// A file's text after migration, and what was done to it.
#[derive(Debug)]
pub struct Migrated {
    /// The new text; equal to the input when nothing was rewritten.
    pub text: String,
    pub findings: Vec<Finding>,
}

/// One thing done to (or not done to) one document of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// 1-based, counting the documents that have content.
    pub document: usize,
    /// 1-based line in the file where the document's content starts.
    pub line: usize,
    pub object: Option<ObjectName>,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `apiVersion` rewritten from [`FROM`] to [`TO`].
    ApiVersion,
    /// A KmsGrant's `spec.name` removed; its value names a grant the operator left on KMS.
    RemovedSpecName(Value),
    /// The document still names [`FROM`] but was not rewritten, for the reason given.
    LeftForHand(String),
}

/// Kind, namespace and name of an object, as a user finds it in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectName {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// 1-based position in a `kind: List`'s `items`.
    pub list_item: Option<usize>,
}

impl ObjectName {
    fn of(object: &Value, list_item: Option<usize>) -> Self {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        ObjectName {
            kind: text(&object["kind"]).unwrap_or_else(|| "(no kind)".into()),
            namespace: text(&object["metadata"]["namespace"]),
            name: text(&object["metadata"]["name"]),
            list_item,
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kind)?;
        match (&self.namespace, &self.name) {
            (Some(namespace), Some(name)) => write!(f, " {namespace}/{name}")?,
            (None, Some(name)) => write!(f, " {name}")?,
            (_, None) => {}
        }
        if let Some(item) = self.list_item {
            write!(f, " (List item {item})")?;
        }
        Ok(())
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let object = self.object.as_ref().map(ObjectName::to_string);
        let object = object.as_deref().unwrap_or("(no object)");
        match &self.change {
            Change::ApiVersion => write!(f, "{object}: apiVersion {FROM} -> {TO}"),
            Change::RemovedSpecName(Value::Null) => {
                write!(f, "{object}: removed spec.name (empty: it named no grant)")
            }
            Change::RemovedSpecName(value) => {
                let value = match value {
                    Value::String(s) => format!("{s:?}"),
                    other => other.to_string(),
                };
                write!(
                    f,
                    "{object}: removed spec.name {value} (the grant of that name was left on KMS: \
                     import it with spec.importGrantId or revoke it; see docs/versioning.md)"
                )
            }
            Change::LeftForHand(reason) => {
                write!(f, "document {} at line {}", self.document, self.line)?;
                if let Some(object) = &self.object {
                    write!(f, " ({object})")?;
                }
                write!(f, ": not rewritten: {reason}; edit it by hand")
            }
        }
    }
}

/// Migrates every document of a file's text.
pub fn migrate(text: &str) -> Migrated {
    let mut out = String::with_capacity(text.len());
    // A byte order mark is kept, and not read as part of the first key.
    let text = match text.strip_prefix('\u{feff}') {
        Some(rest) => {
            out.push('\u{feff}');
            rest
        }
        None => text,
    };
    let mut findings = Vec::new();
    let mut document = 0;
    let mut lines_before = 0;
    for doc in documents(text) {
        let lines = DocLines::new(doc);
        if let Some(first) = lines.first_content() {
            document += 1;
            let line = lines_before + first + 1;
            let finding = |object, change| Finding {
                document,
                line,
                object,
                change,
            };
            match migrate_document(doc, &lines, lines_before) {
                Outcome::Unchanged => out.push_str(doc),
                Outcome::Rewritten { text, changes } => {
                    out.push_str(&text);
                    findings.extend(
                        changes
                            .into_iter()
                            .map(|(object, change)| finding(Some(object), change)),
                    );
                }
                Outcome::LeftForHand { object, reason } => {
                    out.push_str(doc);
                    findings.push(finding(object, Change::LeftForHand(reason)));
                }
            }
        } else {
            out.push_str(doc);
        }
        lines_before += lines.raw.len();
    }
    Migrated {
        text: out,
        findings,
    }
}

/// The documents of a YAML stream, as slices that together are the whole text. Each but the first
/// starts with its `---` line.
fn documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > start && is_document_start(line) {
            docs.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

fn is_document_start(line: &str) -> bool {
    marker(line, "---")
}

fn is_document_end(line: &str) -> bool {
    marker(line, "...")
}

fn marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// A document's lines: as written (with their line breaks), and as read here, without line
/// breaks and with the `---` line and anything after a `...` line blanked.
struct DocLines<'a> {
    raw: Vec<&'a str>,
    content: Vec<Cow<'a, str>>,
}

impl<'a> DocLines<'a> {
    fn new(doc: &'a str) -> Self {
        let raw: Vec<&str> = doc.split_inclusive('\n').collect();
        let mut ended = false;
        let content = raw
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let line = line.trim_end_matches('\n').trim_end_matches('\r');
                if (i == 0 && is_document_start(line)) || ended {
                    return Cow::Borrowed("");
                }
                if is_document_end(line) {
                    ended = true;
                    return Cow::Borrowed("");
                }
                Cow::Borrowed(line)
            })
            .collect();
        DocLines { raw, content }
    }

    /// Index of the first line that is neither blank nor a comment.
    fn first_content(&self) -> Option<usize> {
        self.content.iter().position(|l| !is_blank_or_comment(l))
    }
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// A block sequence entry: `- ...` or a lone `-`.
fn is_sequence_entry(trimmed: &str) -> bool {
    trimmed == "-" || trimmed.starts_with("- ") || trimmed.starts_with("-\t")
}

enum Outcome {
    Unchanged,
    Rewritten {
        text: String,
        changes: Vec<(ObjectName, Change)>,
    },
    LeftForHand {
        object: Option<ObjectName>,
        reason: String,
    },
}

/// An object to rewrite: the document itself or one of its `items`.
struct Target {
    /// 0-based index in `items`.
    item: Option<usize>,
    name: ObjectName,
}

/// Migrates one document, which follows `lines_before` lines of its file.
fn migrate_document(doc: &str, lines: &DocLines, lines_before: usize) -> Outcome {
    if !doc.contains("kmsgrant.io") {
        return Outcome::Unchanged;
    }
    let original: Value = match serde_saphyr::from_str(doc) {
        Ok(value) => value,
        Err(_) if !names_from_version(&lines.content) => return Outcome::Unchanged,
        Err(err) => {
            let reason = if doc.contains("{{") {
                "it holds Helm template syntax ({{ }}) and is not YAML until rendered".to_owned()
            } else {
                format!(
                    "it does not parse as YAML ({})",
                    parse_error(&err, lines_before)
                )
            };
            return Outcome::LeftForHand {
                object: None,
                reason,
            };
        }
    };
    let targets = match targets(&original) {
        Ok(targets) if targets.is_empty() => return Outcome::Unchanged,
        Ok(targets) => targets,
        Err((object, reason)) => return Outcome::LeftForHand { object, reason },
    };
    let document_object = match targets.as_slice() {
        [Target { item: None, name }] => name.clone(),
        _ => ObjectName::of(&original, None),
    };
    let left = |reason: String| Outcome::LeftForHand {
        object: Some(document_object.clone()),
        reason,
    };

    let mut edits = Vec::new();
    let located = match targets.as_slice() {
        [Target { item: None, name }] => object_edits(
            &lines.content,
            0..lines.content.len(),
            0,
            &name.kind,
            &original,
            &mut edits,
        ),
        _ => list_edits(lines, &original, &targets, &mut edits),
    };
    if let Err(reason) = located {
        return left(reason);
    }
    let text = apply(&lines.raw, &edits);

    let mut expected = original;
    let mut changes = Vec::new();
    for target in targets {
        let object = match target.item {
            None => &mut expected,
            Some(i) => &mut expected["items"][i],
        };
        object["apiVersion"] = Value::from(TO);
        changes.push((target.name.clone(), Change::ApiVersion));
        if target.name.kind == "KmsGrant"
            && let Some(value) = object
                .get_mut("spec")
                .and_then(Value::as_object_mut)
                .and_then(|spec| spec.remove("name"))
        {
            changes.push((target.name, Change::RemovedSpecName(value)));
        }
    }
    match serde_saphyr::from_str::<Value>(&text) {
        Ok(rewritten) if rewritten == expected => Outcome::Rewritten { text, changes },
        Ok(_) => left(
            "the rewritten text does not read back as the original with only apiVersion and \
             spec.name changed"
                .into(),
        ),
        Err(err) => left(format!("the rewritten text does not parse ({err})")),
    }
}

/// The parser's message in a line, with its line number counted in the file rather than in the
/// document.
fn parse_error(err: &serde_saphyr::Error, lines_before: usize) -> String {
    let message = err.to_string();
    let message = message.lines().next().unwrap_or_default();
    let message = message.strip_prefix("error: ").unwrap_or(message);
    // The parser's advice on its own options means nothing to someone editing a manifest.
    let message = message
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(message);
    let located = message.strip_prefix("line ").and_then(|rest| {
        let (line, rest) = rest.split_once(' ')?;
        Some(format!(
            "line {} {rest}",
            line.parse::<usize>().ok()? + lines_before
        ))
    });
    located.unwrap_or_else(|| message.to_owned())
}

/// Whether a document that does not parse still looks like one to migrate: an `apiVersion` line
/// naming [`FROM`], or a templated one naming the group.
fn names_from_version(lines: &[Cow<str>]) -> bool {
    lines.iter().any(|line| {
        let line = line.trim_start_matches([' ', '-']);
        line.strip_prefix("apiVersion:").is_some_and(|value| {
            value.contains(FROM) || (value.contains("{{") && value.contains("kmsgrant.io"))
        })
    })
}

/// The objects of a parsed document that are at [`FROM`]: the document itself, or the items of a
/// `kind: List`. An error when one is there but cannot be migrated.
fn targets(doc: &Value) -> Result<Vec<Target>, (Option<ObjectName>, String)> {
    let migratable = |object: &Value, item: Option<usize>| {
        let name = ObjectName::of(object, item.map(|i| i + 1));
        if KINDS.contains(&name.kind.as_str()) {
            Ok(Target { item, name })
        } else {
            let reason = format!(
                "kind {:?} is not one of {} (a typed list? write it as a kind: List)",
                name.kind,
                KINDS.join(", ")
            );
            Err((Some(name), reason))
        }
    };
    if doc["apiVersion"] == FROM {
        return Ok(vec![migratable(doc, None)?]);
    }
    let Some(items) = doc["items"].as_array() else {
        return Ok(Vec::new());
    };
    let found = items
        .iter()
        .enumerate()
        .filter(|(_, item)| item["apiVersion"] == FROM)
        .map(|(i, item)| migratable(item, Some(i)))
        .collect::<Result<Vec<_>, _>>()?;
    if !found.is_empty() && doc["kind"] != "List" {
        let reason = "its items are at kmsgrant.io/v1alpha1 but it is not a kind: List".to_owned();
        return Err((Some(ObjectName::of(doc, None)), reason));
    }
    Ok(found)
}

/// A change to a document's text, in the lines as read.
enum Edit {
    Replace {
        line: usize,
        range: Range<usize>,
        with: &'static str,
    },
    Remove(Range<usize>),
}

fn apply(raw: &[&str], edits: &[Edit]) -> String {
    let mut out = String::new();
    for (i, line) in raw.iter().enumerate() {
        let mut kept = Cow::Borrowed(*line);
        for edit in edits {
            match edit {
                Edit::Remove(lines) if lines.contains(&i) => kept = Cow::Borrowed(""),
                Edit::Replace {
                    line: at,
                    range,
                    with,
                } if *at == i => {
                    kept = Cow::Owned(format!(
                        "{}{with}{}",
                        &line[..range.start],
                        &line[range.end..]
                    ));
                }
                _ => {}
            }
        }
        out.push_str(&kept);
    }
    out
}

/// A `key:` line of a block mapping and the lines its value takes.
struct Entry {
    key: String,
    line: usize,
    /// Where the text after the `:` starts.
    value_at: usize,
    /// One past the value's last line that is not blank.
    end: usize,
}

/// The entries of the block mapping whose keys are at column `indent` in `range`.
fn entries(lines: &[Cow<str>], range: Range<usize>, indent: usize) -> Result<Vec<Entry>, String> {
    let mut found: Vec<Entry> = Vec::new();
    for i in range {
        let line = &lines[i];
        if line.trim().is_empty() {
            continue;
        }
        let at = self::indent(line);
        let trimmed = &line[at..];
        let comment = trimmed.starts_with('#');
        // Deeper lines, and a sequence written at the key's own column, belong to the value.
        if at > indent || (at == indent && is_sequence_entry(trimmed)) {
            if let Some(entry) = found.last_mut() {
                entry.end = i + 1;
            } else if !comment {
                return Err(format!(
                    "the line {:?} comes before any key it could belong to",
                    line.trim()
                ));
            }
            continue;
        }
        if comment {
            continue;
        }
        if at < indent {
            return Err(format!(
                "the line {:?} is indented less than expected",
                line.trim()
            ));
        }
        let (key, value_at) = split_key(trimmed)
            .ok_or_else(|| format!("the line {:?} is not a `key: value` line", line.trim()))?;
        found.push(Entry {
            key,
            line: i,
            value_at: at + value_at,
            end: i + 1,
        });
    }
    Ok(found)
}

/// The one entry named `key`; an error when there is none or more than one.
fn only<'e>(entries: &'e [Entry], key: &str, parent: &str) -> Result<&'e Entry, String> {
    match entries.iter().filter(|e| e.key == key).collect::<Vec<_>>()[..] {
        [entry] => Ok(entry),
        [] => Err(format!("no `{key}:` line was found {parent}")),
        _ => Err(format!("`{key}:` appears more than once {parent}")),
    }
}

/// The key of a `key: value` line and where the text after its `:` starts. Quoted keys are read;
/// complex (`? `) and flow keys are not.
fn split_key(line: &str) -> Option<(String, usize)> {
    let (key, after) = match line.chars().next()? {
        quote @ ('"' | '\'') => {
            let end = line[1..].find(quote)? + 1;
            (line[1..end].to_owned(), end + 1)
        }
        '?' | '[' | '{' | '&' | '*' | '!' | '|' | '>' | '%' | '@' | '`' => return None,
        _ => {
            let colon = line
                .match_indices(':')
                .map(|(i, _)| i)
                .find(|&i| matches!(line[i + 1..].chars().next(), None | Some(' ' | '\t')))?;
            (line[..colon].trim_end().to_owned(), colon)
        }
    };
    let colon = after + (line[after..].len() - line[after..].trim_start_matches(' ').len());
    let rest = line[colon..].strip_prefix(':')?;
    matches!(rest.chars().next(), None | Some(' ' | '\t')).then_some((key, colon + 1))
}

/// The scalar written after a key on the same line (without its quotes) and where it is; `None`
/// when the value is on the following lines.
fn inline_value(line: &str, from: usize) -> Option<(&str, Range<usize>)> {
    let rest = &line[from..];
    let start = from + (rest.len() - rest.trim_start().len());
    let rest = &line[start..];
    match rest.chars().next()? {
        '#' => None,
        quote @ ('"' | '\'') => {
            let end = rest[1..].find(quote)? + 1;
            Some((&rest[1..end], start + 1..start + end))
        }
        _ => {
            let end = [" #", "\t#"]
                .iter()
                .filter_map(|c| rest.find(c))
                .min()
                .unwrap_or(rest.len());
            let value = rest[..end].trim_end();
            Some((value, start..start + value.len()))
        }
    }
}

fn templated(lines: &[Cow<str>], range: Range<usize>) -> bool {
    lines[range].iter().any(|line| line.contains("{{"))
}

/// The edits that migrate one object: the block mapping with keys at column `indent` in `range`.
fn object_edits(
    lines: &[Cow<str>],
    range: Range<usize>,
    indent: usize,
    kind: &str,
    object: &Value,
    edits: &mut Vec<Edit>,
) -> Result<(), String> {
    let entries = entries(lines, range, indent)?;
    let parent = "at the object's top level";
    let api_version = only(&entries, "apiVersion", parent)?;
    let kind_line = only(&entries, "kind", parent)?;
    for entry in [api_version, kind_line] {
        if templated(lines, entry.line..entry.end) {
            return Err(format!(
                "its {} line holds Helm template syntax ({{{{ }}}})",
                entry.key
            ));
        }
    }
    let (_, range) = inline_value(&lines[api_version.line], api_version.value_at)
        .filter(|(value, _)| *value == FROM)
        .ok_or_else(|| format!("its apiVersion is not written as {FROM} on the apiVersion line"))?;
    edits.push(Edit::Replace {
        line: api_version.line,
        range,
        with: TO,
    });

    if kind != "KmsGrant" {
        return Ok(());
    }
    let spec = match entries.iter().filter(|e| e.key == "spec").count() {
        0 => return Ok(()),
        _ => only(&entries, "spec", parent)?,
    };
    // A template in the spec could render a spec.name this cannot see.
    if templated(lines, spec.line..spec.end) {
        return Err("its spec holds Helm template syntax ({{ }})".into());
    }
    if object["spec"].get("name").is_none() {
        return Ok(());
    }
    if inline_value(&lines[spec.line], spec.value_at).is_some() {
        return Err("its spec is written on the spec: line (flow style)".into());
    }
    let block = spec.line + 1..spec.end;
    let child_indent = lines[block.clone()]
        .iter()
        .find(|l| !is_blank_or_comment(l))
        .map(|l| self::indent(l))
        .ok_or("its spec has no lines")?;
    let children = self::entries(lines, block, child_indent)?;
    let name = only(&children, "name", "directly under spec")?;
    edits.push(Edit::Remove(name.line..name.end));
    Ok(())
}

/// The edits that migrate the `targets` among the items of a `kind: List`.
fn list_edits(
    lines: &DocLines,
    list: &Value,
    targets: &[Target],
    edits: &mut Vec<Edit>,
) -> Result<(), String> {
    let content = &lines.content;
    let top = entries(content, 0..content.len(), 0)?;
    let items = only(&top, "items", "at the List's top level")?;
    if inline_value(&content[items.line], items.value_at).is_some() {
        return Err("its items are written on the items: line (flow style)".into());
    }
    let block = items.line + 1..items.end;
    let first = block
        .clone()
        .find(|&i| !is_blank_or_comment(&content[i]))
        .ok_or("its items have no lines")?;
    let column = indent(&content[first]);
    let starts: Vec<usize> = block
        .clone()
        .filter(|&i| indent(&content[i]) == column && is_sequence_entry(&content[i][column..]))
        .collect();
    let count = list["items"].as_array().map_or(0, Vec::len);
    if starts.first() != Some(&first) || starts.len() != count {
        return Err("its items could not be told apart line by line".into());
    }
    // Each item is read as a mapping whose first key follows the `- `; blanking the dash (same
    // length, so columns hold) lets it be read like a document's top level.
    let mut view = content.clone();
    for target in targets {
        let i = target.item.expect("list targets are items");
        let start = starts[i];
        let end = starts.get(i + 1).copied().unwrap_or(block.end);
        let after_dash = &view[start][column + 1..];
        let (range, key_column) = if is_blank_or_comment(after_dash) {
            let next = (start + 1..end)
                .find(|&l| !is_blank_or_comment(&view[l]))
                .ok_or("an item has no lines")?;
            (start + 1..end, indent(&view[next]))
        } else {
            let blanked = format!("{} {after_dash}", " ".repeat(column));
            let key_column = indent(&blanked);
            view[start] = Cow::Owned(blanked);
            (start..end, key_column)
        };
        object_edits(
            &view,
            range,
            key_column,
            &target.name.kind,
            &list["items"][i],
            edits,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn changes(migrated: &Migrated) -> Vec<String> {
        migrated.findings.iter().map(Finding::to_string).collect()
    }

    const GRANT: &str = "\
# The app's grant on the team key.
apiVersion: kmsgrant.io/v1alpha1   # moved by hand, once
kind: KmsGrant
metadata:
  namespace: team-a
  name: app-key # metadata.name stays
  labels: {app: web}
spec:
  providerConfigRef:
    name: default
  name: my-old-grant
  keyId: bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e

  operations: [describe-key,   encrypt-datakey]   # odd spacing kept
status:
  grantName: k8s/c/team-a/app-key
";

    #[test]
    fn rewrites_api_version_and_keeps_comments_and_order_byte_for_byte() {
        let migrated = migrate(GRANT);
        let expected = GRANT
            .replace(
                "apiVersion: kmsgrant.io/v1alpha1   #",
                "apiVersion: kmsgrant.io/v1beta1   #",
            )
            .replace("  name: my-old-grant\n", "");
        assert_eq!(migrated.text, expected);
        assert_eq!(
            changes(&migrated),
            [
                "KmsGrant team-a/app-key: apiVersion kmsgrant.io/v1alpha1 -> kmsgrant.io/v1beta1",
                "KmsGrant team-a/app-key: removed spec.name \"my-old-grant\" (the grant of that \
                 name was left on KMS: import it with spec.importGrantId or revoke it; see \
                 docs/versioning.md)",
            ]
        );
    }

    #[test]
    fn keeps_a_byte_order_mark() {
        let text = format!("\u{feff}{GRANT}");
        assert_eq!(
            migrate(&text).text,
            format!("\u{feff}{}", migrate(GRANT).text)
        );
    }

    #[test]
    fn keeps_windows_line_breaks() {
        let text = GRANT.replace('\n', "\r\n");
        let migrated = migrate(&text);
        assert!(
            migrated
                .text
                .contains("apiVersion: kmsgrant.io/v1beta1   #")
        );
        assert!(!migrated.text.contains("my-old-grant"));
        assert_eq!(
            migrated.text.replace("\r\n", "\n"),
            migrate(GRANT).text,
            "only the line breaks differ"
        );
        assert!(!migrated.text.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn removes_spec_name_only_directly_under_the_spec_of_a_kmsgrant() {
        let migrated = migrate(GRANT);
        assert!(
            migrated
                .text
                .contains("  name: app-key # metadata.name stays\n")
        );
        assert!(
            migrated
                .text
                .contains("  providerConfigRef:\n    name: default\n")
        );
        assert!(!migrated.text.contains("my-old-grant"));
    }

    #[test]
    fn keeps_nested_names_when_a_kmsgrant_has_no_spec_name() {
        let text = "apiVersion: kmsgrant.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: a\nspec:\n  providerConfigRef:\n    name: tenant\n  keyRef:\n    alias: alias/app\n";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            text.replace("kmsgrant.io/v1alpha1", "kmsgrant.io/v1beta1")
        );
        assert_eq!(
            changes(&migrated),
            ["KmsGrant a: apiVersion kmsgrant.io/v1alpha1 -> kmsgrant.io/v1beta1"]
        );
    }

    #[test]
    fn removes_a_spec_name_written_over_several_lines_with_all_its_lines() {
        let text = "\
apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: a
spec:
  keyId: bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e
  name: >-
    a folded

    old name
  # the operations this app needs
  operations:
  - describe-key
";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            "\
apiVersion: kmsgrant.io/v1beta1
kind: KmsGrant
metadata:
  name: a
spec:
  keyId: bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e
  # the operations this app needs
  operations:
  - describe-key
"
        );
        assert_eq!(
            migrated.findings[1].change,
            Change::RemovedSpecName(json!("a folded\nold name"))
        );
    }

    #[test]
    fn removes_an_empty_spec_name_and_says_it_named_no_grant() {
        let text = "apiVersion: kmsgrant.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: a\nspec:\n  name:\n  keyId: k\n";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            "apiVersion: kmsgrant.io/v1beta1\nkind: KmsGrant\nmetadata:\n  name: a\nspec:\n  keyId: k\n"
        );
        assert_eq!(
            changes(&migrated)[1],
            "KmsGrant a: removed spec.name (empty: it named no grant)"
        );
    }

    #[test]
    fn rewrites_provider_configs_and_key_policies_without_removing_any_name() {
        let text = "\
apiVersion: kmsgrant.io/v1alpha1
kind: KmsProviderConfig
metadata:
  name: default
spec:
  auth:
    secretRef:
      name: kms-credentials
      namespace: kmsgrant-system
---
apiVersion: kmsgrant.io/v1alpha1
kind: KmsKeyPolicy
metadata:
  name: team-key
spec:
  name: not-a-removed-field
";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text.replace(FROM, TO));
        assert_eq!(
            changes(&migrated),
            [
                "KmsProviderConfig default: apiVersion kmsgrant.io/v1alpha1 -> kmsgrant.io/v1beta1",
                "KmsKeyPolicy team-key: apiVersion kmsgrant.io/v1alpha1 -> kmsgrant.io/v1beta1",
            ]
        );
    }

    #[test]
    fn leaves_other_kinds_other_groups_and_other_versions_alone() {
        let text = "\
# kmsgrant.io/v1alpha1 in a comment is not a manifest.
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
  annotations:
    kmsgrant.io/legacy-grant-name: old
data:
  apiVersion: kmsgrant.io/v1alpha1
---
apiVersion: example.com/v1alpha1
kind: KmsGrant
metadata:
  name: lookalike
spec:
  name: kept
---
apiVersion: kmsgrant.io/v1beta1
kind: KmsGrant
metadata:
  name: already-moved
spec:
  keyId: k
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: guardrails
spec:
  paramKind:
    apiVersion: kmsgrant.io/v1alpha1
    kind: KmsProviderConfig
";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        assert!(migrated.findings.is_empty(), "{:?}", changes(&migrated));
    }

    #[test]
    fn rewrites_each_document_of_a_multi_document_file_and_keeps_the_separators() {
        let text = "\
---
# first
apiVersion: kmsgrant.io/v1alpha1
kind: KmsProviderConfig
metadata:
  name: default
--- # second
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
---

apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: app
  namespace: team-a
spec:
  name: legacy
  keyId: k
...
";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            text.replace(FROM, TO).replace("  name: legacy\n", "")
        );
        assert_eq!(
            migrated
                .findings
                .iter()
                .map(|f| (f.document, f.line))
                .collect::<Vec<_>>(),
            [(1, 3), (3, 14), (3, 14)]
        );
    }

    #[test]
    fn keeps_the_quotes_and_comment_of_a_quoted_api_version() {
        let text = "\"apiVersion\": \"kmsgrant.io/v1alpha1\" # quoted\nkind: 'KmsKeyPolicy'\nmetadata:\n  name: p\n---\napiVersion: 'kmsgrant.io/v1alpha1'\nkind: KmsProviderConfig\nmetadata:\n  name: q\n";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            "\"apiVersion\": \"kmsgrant.io/v1beta1\" # quoted\nkind: 'KmsKeyPolicy'\nmetadata:\n  name: p\n---\napiVersion: 'kmsgrant.io/v1beta1'\nkind: KmsProviderConfig\nmetadata:\n  name: q\n"
        );
        assert_eq!(migrated.findings.len(), 2);
    }

    #[test]
    fn reports_helm_templated_documents_and_leaves_them_untouched() {
        let text = "\
apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: {{ .Release.Name }}
spec:
  keyId: {{ .Values.keyId | quote }}
---
apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: quoted
spec:
  keyId: \"{{ .Values.keyId }}\"
---
apiVersion: {{ .Values.apiVersion | default \"kmsgrant.io/v1alpha1\" }}
kind: KmsProviderConfig
metadata:
  name: default
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}
";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        assert_eq!(
            changes(&migrated),
            [
                "document 1 at line 1: not rewritten: it holds Helm template \
                 syntax ({{ }}) and is not YAML until rendered; edit it by hand",
                "document 2 at line 8 (KmsGrant quoted): not rewritten: its spec holds Helm \
                 template syntax ({{ }}); edit it by hand",
                "document 3 at line 15: not rewritten: it holds Helm template \
                 syntax ({{ }}) and is not YAML until rendered; edit it by hand",
            ]
        );
    }

    #[test]
    fn is_idempotent() {
        let once = migrate(GRANT);
        let twice = migrate(&once.text);
        assert_eq!(twice.text, once.text);
        assert!(twice.findings.is_empty());
    }

    #[test]
    fn rewrites_the_kmsgrant_items_of_a_list() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: kmsgrant.io/v1alpha1
  kind: KmsGrant
  metadata:
    name: a
    namespace: team-a
  spec:
    name: old-a
    keyId: k
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: c
-
  apiVersion: kmsgrant.io/v1alpha1
  kind: KmsProviderConfig
  metadata:
    name: default
metadata:
  resourceVersion: \"\"
";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            text.replace(FROM, TO).replace("    name: old-a\n", "")
        );
        assert_eq!(
            changes(&migrated),
            [
                "KmsGrant team-a/a (List item 1): apiVersion kmsgrant.io/v1alpha1 -> kmsgrant.io/v1beta1",
                "KmsGrant team-a/a (List item 1): removed spec.name \"old-a\" (the grant of that \
                 name was left on KMS: import it with spec.importGrantId or revoke it; see \
                 docs/versioning.md)",
                "KmsProviderConfig default (List item 3): apiVersion kmsgrant.io/v1alpha1 -> \
                 kmsgrant.io/v1beta1",
            ]
        );
    }

    #[test]
    fn rewrites_list_items_indented_under_items() {
        let text = "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: kmsgrant.io/v1alpha1\n    kind: KmsGrant\n    metadata: {name: a}\n    spec:\n      keyId: k\n      name: old\n";
        let migrated = migrate(text);
        assert_eq!(
            migrated.text,
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: kmsgrant.io/v1beta1\n    kind: KmsGrant\n    metadata: {name: a}\n    spec:\n      keyId: k\n"
        );
    }

    #[test]
    fn rewrites_a_kmsgrant_without_a_spec() {
        let text = "apiVersion: kmsgrant.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: a\n";
        assert_eq!(migrate(text).text, text.replace(FROM, TO));
    }

    #[test]
    fn names_the_parse_error_of_a_document_that_is_not_yaml() {
        let text = "a: 1\n---\napiVersion: kmsgrant.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: a\n  name: b\n";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        let report = changes(&migrated).join("\n");
        assert_eq!(
            report,
            "document 2 at line 3: not rewritten: it does not parse as YAML (line 7 column 3: \
             duplicate mapping key: name); edit it by hand"
        );
    }

    #[test]
    fn leaves_flow_style_documents_for_hand_editing() {
        let text = "{apiVersion: kmsgrant.io/v1alpha1, kind: KmsGrant, metadata: {name: a}, spec: {name: x}}\n";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        assert!(matches!(
            migrated.findings[..],
            [Finding {
                change: Change::LeftForHand(_),
                ..
            }]
        ));
        let text = "apiVersion: kmsgrant.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: a\nspec: {name: x, keyId: k}\n";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        assert_eq!(
            changes(&migrated),
            [
                "document 1 at line 1 (KmsGrant a): not rewritten: its spec is written on the \
              spec: line (flow style); edit it by hand"
            ]
        );
    }

    #[test]
    fn leaves_a_spec_name_that_comes_from_a_merge_key_for_hand_editing() {
        let text = "\
apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: a
base: &base
  name: from-anchor
spec:
  <<: *base
  keyId: k
";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        assert!(
            matches!(
                migrated.findings[..],
                [Finding {
                    change: Change::LeftForHand(_),
                    ..
                }]
            ),
            "{:?}",
            changes(&migrated)
        );
    }

    #[test]
    fn reports_a_v1alpha1_kind_it_does_not_know() {
        let text = "apiVersion: kmsgrant.io/v1alpha1\nkind: KmsGrantList\nitems: []\n";
        let migrated = migrate(text);
        assert_eq!(migrated.text, text);
        assert_eq!(
            changes(&migrated),
            [
                "document 1 at line 1 (KmsGrantList): not rewritten: kind \"KmsGrantList\" is \
              not one of KmsGrant, KmsProviderConfig, KmsKeyPolicy (a typed list? write it as \
              a kind: List); edit it by hand"
            ]
        );
    }
}
