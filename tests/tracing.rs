//! OpenTelemetry traces (the `otel` feature): a reconcile is one span naming the object and its
//! key, and each KMS call it makes is a child of it. The controllers run in this process against
//! the real API server and the emulator, with spans collected by an in-memory exporter.
//!
//! Needs the `otel` feature, which `scripts/test` turns on: `scripts/test --test tracing`.
#![cfg(feature = "otel")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms_emulator::EmulatorConfig;
use kmsgrant::controller::Settings;
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde_json::json;
use support::{Env, TEST_LABEL};
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every exported span.
#[derive(Clone, Debug, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> String {
    attribute(span, key)
        .map(|v| v.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconcile_is_one_span_with_its_kms_calls_as_children() {
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(kmsgrant::telemetry::otel_layer(&provider))
        .with(tracing_subscriber::EnvFilter::new("info"));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let env = Env::new("tracing", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("traced");
    let client = kmsgrant::process::kube_client(Some(support::kubeconfig().to_owned()), None)
        .await
        .unwrap();
    let settings = Settings {
        resync: Duration::from_secs(5),
        namespace: Some(env.namespace.clone()),
        label_selector: Some(format!("{TEST_LABEL}={}", env.namespace)),
        secret_namespace: Some(env.namespace.clone()),
        allow_http: true,
        ..Settings::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(kmsgrant::controller::run(
        client,
        settings,
        Arc::new(kmsgrant::metrics::Metrics::new()),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        std::future::ready(()),
        async {
            let _ = stopped.await;
        },
    ));
    env.apply(&env.grant("traced", &key, json!({})));
    env.wait_for("traced", "condition=Ready", 60);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    provider.force_flush().unwrap();

    let spans = collected.0.lock().unwrap().clone();
    let reconciles: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "reconcile" && text(s, "name") == "traced")
        .collect();
    assert!(
        !reconciles.is_empty(),
        "no reconcile span among {} spans",
        spans.len()
    );
    for span in &reconciles {
        assert_eq!(text(span, "key"), key);
        assert_eq!(text(span, "namespace"), env.namespace);
        assert_eq!(text(span, "kind"), "KmsGrant");
    }
    // The reconcile that created the grant made these calls, each a child span of it.
    let creating = reconciles
        .iter()
        .find(|r| {
            spans.iter().any(|s| {
                s.name == "kms"
                    && text(s, "call") == "create-grant"
                    && s.parent_span_id == r.span_context.span_id()
            })
        })
        .unwrap_or_else(|| panic!("no reconcile span is the parent of create-grant: {spans:#?}"));
    let children: Vec<String> = spans
        .iter()
        .filter(|s| s.parent_span_id == creating.span_context.span_id())
        .map(|s| {
            assert_eq!(s.span_context.trace_id(), creating.span_context.trace_id());
            format!("{} {}", s.name, text(s, "call"))
        })
        .collect();
    for call in ["describe-key", "list-grants", "create-grant"] {
        assert!(
            children.contains(&format!("kms {call}")),
            "{call} is not a child of the reconcile: {children:?}"
        );
    }
}
