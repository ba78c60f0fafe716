//! The report: one line per case, the cleanup, and a footer for a bug report; as text or JSON.

use serde::Serialize;

/// How the account answered one documented behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Verdict {
    /// As documented, and as the emulator answers.
    Ok { message: String },
    /// Otherwise: what the documentation (and the emulator) says, what the account answered,
    /// and what it means for the operator.
    Differs {
        expected: String,
        got: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        consequence: Option<String>,
    },
    /// The case could not be carried out (a call failed for another reason); nothing is known.
    Error { message: String },
    /// Nothing to judge (throttling never happened).
    Skip { message: String },
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    pub case: &'static str,
    /// Where the behaviour is documented.
    pub documented: &'static str,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// A grant the cleanup revoked or could not.
#[derive(Clone, Debug, Serialize)]
pub struct CleanedGrant {
    pub grant_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `name` (carried this run's prefix) or `grant ID` (created by this run, listed without
    /// its name, or the key could not be listed).
    pub found_by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the cleanup did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cleanup {
    pub removed: Vec<CleanedGrant>,
    /// Grants of this run still on the key: revoke them by hand.
    pub left: Vec<CleanedGrant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Grants of earlier runs of the kit found on the key; never touched by this run.
    pub earlier_runs: Vec<CleanedGrant>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kit: &'static str,
    pub version: &'static str,
    pub run: String,
    pub endpoint: String,
    pub project_id: String,
    pub key_id: String,
    pub signing: String,
    pub cases: Vec<CaseReport>,
    pub cleanup: Cleanup,
    /// Ctrl-C stopped the cases before the end (the cleanup ran).
    pub interrupted: bool,
    pub summary: Summary,
    pub footer: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub differs: usize,
    pub errors: usize,
    pub skipped: usize,
}

impl Report {
    /// Every case as documented, the run complete and nothing of it left on the key.
    pub fn all_match(&self) -> bool {
        self.summary.differs == 0
            && self.summary.errors == 0
            && !self.interrupted
            && self.cleanup.left.is_empty()
            && self.cleanup.error.is_none()
    }
}

pub(super) fn summarise(cases: &[CaseReport]) -> Summary {
    let mut summary = Summary::default();
    for case in cases {
        match case.verdict {
            Verdict::Ok { .. } => summary.ok += 1,
            Verdict::Differs { .. } => summary.differs += 1,
            Verdict::Error { .. } => summary.errors += 1,
            Verdict::Skip { .. } => summary.skipped += 1,
        }
    }
    summary
}

pub(super) fn footer(summary: Summary, all_match: bool) -> String {
    if all_match {
        return "Every behaviour checked matches the documentation and the emulator on this account. \
                Attach this report to any bug report about kmsgrant-operator on this cloud: it names \
                the endpoint, project, key and grant IDs, and holds no credential."
            .into();
    }
    format!(
        "{} case(s) differ from the emulator and {} could not be run. Please attach this report \
         (or `live-test -o json`) to a bug report for kmsgrant-operator: each DIFFERS line says \
         what the documentation and the emulator expect and what this account answered. The \
         report names the endpoint, project, key and grant IDs, and holds no credential.",
        summary.differs, summary.errors
    )
}

/// The report as people read it.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "kmsgrant-operator live-test {} — run {} on {} (project {}, key {}, {} signing)\n",
        report.version,
        report.run,
        report.endpoint,
        report.project_id,
        report.key_id,
        report.signing
    );
    for case in &report.cases {
        let line = match &case.verdict {
            Verdict::Ok { message } => format!("ok       {:<26} {message}", case.case),
            Verdict::Differs {
                expected,
                got,
                consequence,
            } => {
                let mut line = format!(
                    "DIFFERS  {:<26} expected {expected} per {}, got {got}",
                    case.case, case.documented
                );
                if let Some(consequence) = consequence {
                    line.push_str(&format!("\n         {:<26} {consequence}", ""));
                }
                line
            }
            Verdict::Error { message } => format!("ERROR    {:<26} {message}", case.case),
            Verdict::Skip { message } => format!("skip     {:<26} {message}", case.case),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if report.interrupted {
        out.push_str("INTERRUPTED: Ctrl-C stopped the cases; the cleanup ran\n");
    }
    let cleanup = &report.cleanup;
    let listed = |grants: &[CleanedGrant]| -> String {
        grants
            .iter()
            .map(|g| match &g.name {
                Some(name) => format!("{} ({name}, by {})", g.grant_id, g.found_by),
                None => format!("{} (by {})", g.grant_id, g.found_by),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push_str(&format!(
        "cleanup  revoked {} grant(s) of this run{}{}\n",
        cleanup.removed.len(),
        if cleanup.removed.is_empty() {
            String::new()
        } else {
            format!(": {}", listed(&cleanup.removed))
        },
        if cleanup.left.is_empty() && cleanup.error.is_none() {
            format!("; nothing of it is left on key {}", report.key_id)
        } else {
            String::new()
        }
    ));
    if let Some(error) = &cleanup.error {
        out.push_str(&format!("CLEANUP  {error}\n"));
    }
    for left in &cleanup.left {
        out.push_str(&format!(
            "LEFT     grant {} ({}) is still on key {}: {}; revoke it by hand (revoke-grant)\n",
            left.grant_id,
            left.name.as_deref().unwrap_or("no name listed"),
            report.key_id,
            left.error.as_deref().unwrap_or("revoke failed")
        ));
    }
    if !cleanup.earlier_runs.is_empty() {
        out.push_str(&format!(
            "note     {} grant(s) of earlier kit runs are on the key, untouched: {}\n",
            cleanup.earlier_runs.len(),
            listed(&cleanup.earlier_runs)
        ));
    }
    let s = report.summary;
    out.push_str(&format!(
        "{} cases: {} ok, {} differ, {} errors, {} skipped\n\n{}\n",
        report.cases.len(),
        s.ok,
        s.differs,
        s.errors,
        s.skipped,
        report.footer
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_test::Case;
    use crate::live_test::cases::NAMES_CONSEQUENCE;

    #[test]
    fn the_text_report_says_where_it_differs_per_which_document_and_ends_with_the_footer() {
        let cases = vec![
            CaseReport {
                case: "name-round-trip",
                documented: Case::NameRoundTrip.documented(),
                verdict: Verdict::Differs {
                    expected: "a name".into(),
                    got: "none".into(),
                    consequence: Some(NAMES_CONSEQUENCE.into()),
                },
            },
            CaseReport {
                case: "throttling",
                documented: Case::Throttling.documented(),
                verdict: Verdict::Skip {
                    message: "not seen".into(),
                },
            },
        ];
        let summary = summarise(&cases);
        let report = Report {
            kit: "kmsgrant-operator live-test",
            version: "0.1.0",
            run: "abc".into(),
            endpoint: "https://kms".into(),
            project_id: "p".into(),
            key_id: "k".into(),
            signing: "Huawei".into(),
            cases,
            cleanup: Cleanup::default(),
            interrupted: false,
            summary,
            footer: footer(summary, false),
        };
        assert!(!report.all_match());
        let text = render(&report);
        assert!(
            text.contains("DIFFERS  name-round-trip            expected a name per Querying Grants on a CMK (kms_02_0031)"),
            "{text}"
        );
        assert!(text.contains(", got none\n"), "{text}");
        assert!(text.contains("GrantNamesNotReturned"), "{text}");
        assert!(text.contains("2 cases: 0 ok, 1 differ, 0 errors, 1 skipped"));
        assert!(text.trim_end().ends_with("holds no credential."), "{text}");
        assert!(text.contains("attach this report"), "{text}");
    }
}
