//! `migrate --cluster` and `migrate --check`: the operator leader's storage migration, run by
//! hand, and the check that must pass before an upgrade stops serving `v1alpha1`.

use std::process::ExitCode;

use super::{MigrateArgs, USAGE_OR_IO_ERROR};
use crate::storage_migration::{
    MigrationError, migrate_storage, preserve_legacy_grant_names, remaining_uses,
};

pub(super) fn run(args: &MigrateArgs) -> ExitCode {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let client = match crate::process::kube_client(
            args.kubeconfig.clone(),
            args.context.clone(),
        )
        .await
        {
            Ok(client) => client,
            Err(err) => {
                eprintln!("error: {err:#}");
                return ExitCode::from(USAGE_OR_IO_ERROR);
            }
        };
        let result = if args.check {
            check(&client).await
        } else {
            migrate(&client, args.dry_run).await
        };
        result.unwrap_or_else(|err| {
            eprintln!("error: {err}");
            ExitCode::from(USAGE_OR_IO_ERROR)
        })
    })
}

async fn migrate(client: &kube::Client, dry_run: bool) -> Result<ExitCode, MigrationError> {
    let prefix = if dry_run { "would keep" } else { "kept" };
    for (object, name) in preserve_legacy_grant_names(client, None, dry_run).await? {
        println!(
            "KmsGrant {object}: {prefix} the removed spec.name {name:?} in the annotation {}",
            crate::api::versions::LEGACY_GRANT_NAME_ANNOTATION
        );
    }
    for report in migrate_storage(client, dry_run, true, &()).await? {
        match &report.skipped {
            Some(why) => println!("{}: skipped ({why})", report.kind),
            None => println!(
                "{}: {} {} object(s) at {} ({} with managedFields of {}); stored versions were {:?}{}",
                report.kind,
                if dry_run { "would rewrite" } else { "rewrote" },
                report.rewritten,
                crate::api::API_VERSION,
                report.managed_fields_rewritten,
                crate::api::versions::DEPRECATED_API_VERSION,
                report.stored_before,
                if dry_run {
                    String::new()
                } else {
                    format!(", now [{}]", crate::api::versions::VERSION)
                },
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(client: &kube::Client) -> Result<ExitCode, MigrationError> {
    let remaining = remaining_uses(client).await?;
    if remaining.is_empty() {
        println!(
            "ok: nothing stores or manages {}: it can stop being served",
            crate::api::versions::DEPRECATED_API_VERSION
        );
        return Ok(ExitCode::SUCCESS);
    }
    for line in &remaining {
        println!("not yet: {line}");
    }
    println!(
        "{} thing(s) still store or manage {}: do not stop serving it yet",
        remaining.len(),
        crate::api::versions::DEPRECATED_API_VERSION
    );
    Ok(ExitCode::FAILURE)
}
