//! `kmsgrant-operator migrate`: moves manifests from `kmsgrant.io/v1alpha1` to `v1beta1`.
//!
//! `-f PATH...` rewrites the manifests in a checkout, in place, as `flux migrate -f` does: the
//! `apiVersion` of KmsGrant, KmsProviderConfig and KmsKeyPolicy, and a KmsGrant's removed
//! `spec.name`, whose value is printed because it names a grant the operator left on KMS. The
//! rewriting itself is [`manifests`]; this module finds the files and writes them.

mod cluster;
pub mod manifests;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use manifests::Change;

/// Options of `kmsgrant-operator migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Manifest files, or directories searched recursively for *.yaml and *.yml, to rewrite in
    /// place (comma-separated or repeated).
    #[arg(
        short = 'f',
        long = "filename",
        env = "KMSGRANT_MIGRATE_FILENAME",
        value_delimiter = ',',
        value_name = "PATH"
    )]
    pub filename: Vec<PathBuf>,
    /// Report what would change and write nothing.
    #[arg(long, env = "KMSGRANT_MIGRATE_DRY_RUN")]
    pub dry_run: bool,
    /// Migrate what the cluster stores instead, as the operator's leader does: keep each stored
    /// spec.name in an annotation, rewrite every object and its managedFields at v1beta1, then set
    /// the CRDs' status.storedVersions to [v1beta1]. For clusters that run the operator with
    /// storageMigration off.
    #[arg(long, env = "KMSGRANT_MIGRATE_CLUSTER", conflicts_with_all = ["filename", "check"])]
    pub cluster: bool,
    /// Check whether v1alpha1 can stop being served: exit 1 and name what still stores or
    /// manages it (a CRD's status.storedVersions, an object's managedFields), 0 when nothing does.
    #[arg(long, env = "KMSGRANT_MIGRATE_CHECK", conflicts_with = "filename")]
    pub check: bool,
    /// Kubeconfig for --cluster and --check (default: KUBECONFIG, then in-cluster).
    #[arg(long, env = "KMSGRANT_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context for --cluster and --check.
    #[arg(long, env = "KMSGRANT_CONTEXT")]
    pub context: Option<String>,
}

/// Exit code for usage and I/O errors; 1 means some document was left for hand editing.
const USAGE_OR_IO_ERROR: u8 = 2;

impl MigrateArgs {
    pub fn run(self) -> ExitCode {
        if self.cluster || self.check {
            return cluster::run(&self);
        }
        if self.filename.is_empty() {
            eprintln!(
                "error: nothing to migrate: name the manifests to rewrite with -f/--filename PATH \
                 (a file or a directory), or use --cluster or --check for the cluster's objects"
            );
            return ExitCode::from(USAGE_OR_IO_ERROR);
        }
        migrate_files(&self)
    }
}

/// A file that could not be found, read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What a run did, for the summary line.
#[derive(Debug, Default)]
struct Tally {
    files: usize,
    rewritten: usize,
    names_removed: usize,
    left_for_hand: usize,
    errors: usize,
}

/// `migrate -f`: rewrites the manifests under `args.filename`, printing one line per change.
pub fn migrate_files(args: &MigrateArgs) -> ExitCode {
    let MigrateArgs {
        filename, dry_run, ..
    } = args;
    let mut tally = Tally::default();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for root in filename {
        manifest_files(root, true, &mut files, &mut errors);
    }
    for err in errors {
        eprintln!("error: {err}");
        tally.errors += 1;
    }
    // A file named twice (a directory and a file in it) is migrated once.
    let mut seen = HashSet::new();
    files.retain(|path| seen.insert(fs::canonicalize(path).unwrap_or_else(|_| path.clone())));
    for path in &files {
        if let Err(err) = migrate_file(path, *dry_run, &mut tally) {
            eprintln!("error: {err}");
            tally.errors += 1;
        }
    }
    println!(
        "{}files scanned: {}, documents rewritten: {}, spec.name values removed: {}, documents \
         left for hand editing: {}",
        if *dry_run {
            "dry run, nothing written: "
        } else {
            ""
        },
        tally.files,
        tally.rewritten,
        tally.names_removed,
        tally.left_for_hand,
    );
    if tally.errors > 0 {
        ExitCode::from(USAGE_OR_IO_ERROR)
    } else if tally.left_for_hand > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Adds the manifests at `path` to `files`: the file itself when named on the command line,
/// otherwise *.yaml and *.yml, recursively, sorted. `.git` and symbolic links found in a directory
/// are skipped (a link can loop back). What cannot be read is added to `errors`, and the rest is
/// still searched.
fn manifest_files(path: &Path, named: bool, files: &mut Vec<PathBuf>, errors: &mut Vec<FileError>) {
    let read_error = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = match if named {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    } {
        Ok(metadata) => metadata,
        Err(err) => return errors.push(read_error(err)),
    };
    if metadata.is_file() {
        let yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if named || yaml {
            files.push(path.to_owned());
        }
        return;
    }
    if !metadata.is_dir() || path.file_name().is_some_and(|name| name == ".git") {
        return;
    }
    let entries = fs::read_dir(path).and_then(|dir| {
        dir.map(|e| e.map(|e| e.path()))
            .collect::<io::Result<Vec<_>>>()
    });
    match entries {
        Ok(mut entries) => {
            entries.sort();
            for entry in entries {
                manifest_files(&entry, false, files, errors);
            }
        }
        Err(err) => errors.push(read_error(err)),
    }
}

fn migrate_file(path: &Path, dry_run: bool, tally: &mut Tally) -> Result<(), FileError> {
    let text = fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    tally.files += 1;
    let migrated = manifests::migrate(&text);
    let mut rewritten = BTreeSet::new();
    for finding in &migrated.findings {
        println!("{}: {finding}", path.display());
        match finding.change {
            Change::ApiVersion => {
                rewritten.insert(finding.document);
            }
            Change::RemovedSpecName(_) => tally.names_removed += 1,
            Change::LeftForHand(_) => tally.left_for_hand += 1,
        }
    }
    tally.rewritten += rewritten.len();
    if migrated.text != text && !dry_run {
        write_atomically(path, &migrated.text).map_err(|source| FileError::Write {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Replaces the file's content through a temporary file in its directory and a rename, so that
/// it is never seen half written, keeping its permissions. A symbolic link named on the command
/// line stays a link: its target is written.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let target = fs::canonicalize(path)?;
    let permissions = fs::metadata(&target)?.permissions();
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(io::Error::other("not a file path"));
    };
    let temporary = dir.join(format!(
        ".{}.kmsgrant-migrate-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.set_permissions(permissions)?;
        file.sync_all()?;
        fs::rename(&temporary, &target)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}
