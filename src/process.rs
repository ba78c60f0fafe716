//! What the long-running subcommands (`run`, `dev`) share: the Kubernetes client, the stop
//! signal and how their duration flags are read.

use std::path::PathBuf;

/// A client from `--kubeconfig`/`--context`, else KUBECONFIG or the in-cluster config.
pub async fn kube_client(
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options).await?
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer()
            .await
            .context("no kubeconfig and not in a cluster")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

/// A duration as people write it: `500ms`, `30s`, `5m`, `1m30s`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return std::time::Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?} is out of range"));
    }
    let duration: jiff::SignedDuration = text
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 5m, 1m30s or 500ms"))?;
    std::time::Duration::try_from(duration).map_err(|_| format!("{text:?} must not be negative"))
}
