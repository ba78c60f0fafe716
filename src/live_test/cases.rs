//! The cases: each one documented behaviour, run through the operator's client on the kit's key.
//! They are the API-level rows of the emulator's conformance table
//! (`crates/kms-emulator/tests/conformance.rs`) and the operator's lifecycle of one grant.

use std::time::SystemTime;

use super::kit::{Kit, Throttled, client_config};
use super::report::Verdict;
use crate::controller::fix_for;
use kmsgrant_kms::{Grant, KmsClient, KmsError, NewGrant, Operation};

/// Each case one documented behaviour; the name round trip first, since grant identity (and so
/// adoption and revoking by name) stands on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    NameRoundTrip,
    GrantFields,
    OperationsAsASet,
    RetiringPrincipal,
    DescribeKey,
    Paging,
    SameNameTwice,
    RevokeAndList,
    RevokeAlreadyRevoked,
    RevokeUnknownGrant,
    RevokeMalformedGrantId,
    RevokeOnUnknownKey,
    DescribeMalformedKeyId,
    DescribeUnknownKey,
    ListUnknownKey,
    CreateOnUnknownKey,
    CreateOnMalformedKeyId,
    CreateGrantAlone,
    InvalidGrantee,
    InvalidName,
    LimitOutOfRange,
    WrongSecretKey,
    UserQuotas,
    OperatorLifecycle,
    Throttling,
}

/// What an account listing grants without names means for the operator.
pub(super) const NAMES_CONSEQUENCE: &str = "grant identity cannot work on this account: the operator refuses to adopt or revoke grants by name on a key where this shows (condition reason GrantNamesNotReturned), and check --write-probe fails";

impl Case {
    pub const ALL: [Case; 25] = [
        Case::NameRoundTrip,
        Case::GrantFields,
        Case::OperationsAsASet,
        Case::RetiringPrincipal,
        Case::DescribeKey,
        Case::Paging,
        Case::SameNameTwice,
        Case::RevokeAndList,
        Case::RevokeAlreadyRevoked,
        Case::RevokeUnknownGrant,
        Case::RevokeMalformedGrantId,
        Case::RevokeOnUnknownKey,
        Case::DescribeMalformedKeyId,
        Case::DescribeUnknownKey,
        Case::ListUnknownKey,
        Case::CreateOnUnknownKey,
        Case::CreateOnMalformedKeyId,
        Case::CreateGrantAlone,
        Case::InvalidGrantee,
        Case::InvalidName,
        Case::LimitOutOfRange,
        Case::WrongSecretKey,
        Case::UserQuotas,
        Case::OperatorLifecycle,
        Case::Throttling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::NameRoundTrip => "name-round-trip",
            Case::GrantFields => "grant-fields",
            Case::OperationsAsASet => "operations-as-a-set",
            Case::RetiringPrincipal => "retiring-principal",
            Case::DescribeKey => "describe-key",
            Case::Paging => "paging",
            Case::SameNameTwice => "same-name-twice",
            Case::RevokeAndList => "revoke-and-list",
            Case::RevokeAlreadyRevoked => "revoke-already-revoked",
            Case::RevokeUnknownGrant => "revoke-unknown-grant",
            Case::RevokeMalformedGrantId => "revoke-malformed-grant-id",
            Case::RevokeOnUnknownKey => "revoke-on-unknown-key",
            Case::DescribeMalformedKeyId => "describe-malformed-key-id",
            Case::DescribeUnknownKey => "describe-unknown-key",
            Case::ListUnknownKey => "list-unknown-key",
            Case::CreateOnUnknownKey => "create-on-unknown-key",
            Case::CreateOnMalformedKeyId => "create-on-malformed-key-id",
            Case::CreateGrantAlone => "create-grant-alone",
            Case::InvalidGrantee => "invalid-grantee",
            Case::InvalidName => "invalid-name",
            Case::LimitOutOfRange => "limit-out-of-range",
            Case::WrongSecretKey => "wrong-secret-key",
            Case::UserQuotas => "user-quotas",
            Case::OperatorLifecycle => "operator-lifecycle",
            Case::Throttling => "throttling",
        }
    }

    /// Where the behaviour is documented: the API reference page (its ID on both clouds' sites)
    /// and, where the pages are silent, what the emulator chose (shared/design/kms-api.md).
    pub fn documented(self) -> &'static str {
        match self {
            Case::NameRoundTrip => {
                "Querying Grants on a CMK (kms_02_0031), Table 5 `name` (optional in the answer); Creating a Grant (kms_02_0028) `name`"
            }
            Case::GrantFields => {
                "Querying Grants on a CMK (kms_02_0031), Table 5; creation_date in milliseconds as every example shows"
            }
            Case::OperationsAsASet => {
                "Querying Grants on a CMK (kms_02_0031), Table 5 `operations` (the order is not documented: compared as a set)"
            }
            Case::RetiringPrincipal => {
                "Creating a Grant (kms_02_0028) `retiring_principal`; Retiring a Grant (kms_02_0030): the grantor may retire"
            }
            Case::DescribeKey => {
                "Querying the Information About a CMK (kms_02_0018): key_id by ID or alias/<alias>, key_state, default_key_flag"
            }
            Case::Paging => {
                "Querying Grants on a CMK (kms_02_0031): limit, marker, next_marker, truncated, total"
            }
            Case::SameNameTwice => {
                "Creating a Grant (kms_02_0028): no uniqueness of `name` documented, create-grant not idempotent (the emulator creates both)"
            }
            Case::RevokeAndList => {
                "Revoking a Grant (kms_02_0029); Querying Grants on a CMK (kms_02_0031)"
            }
            Case::RevokeAlreadyRevoked => {
                "Error Codes (kms_02_8887) KMS.2501 Invalid grant ID (for a revoked grant: the emulator's choice)"
            }
            Case::RevokeUnknownGrant => {
                "Error Codes (kms_02_8887) KMS.2501 Invalid grant ID (for an unknown grant: the emulator's choice)"
            }
            Case::RevokeMalformedGrantId => {
                "Revoking a Grant (kms_02_0029) grant_id ^[A-Fa-f0-9]{64}$; Error Codes (kms_02_8887) KMS.2501"
            }
            Case::RevokeOnUnknownKey
            | Case::DescribeUnknownKey
            | Case::ListUnknownKey
            | Case::CreateOnUnknownKey => {
                "Error Codes (kms_02_8887) 404 KMS.0207 The key does not exist"
            }
            Case::DescribeMalformedKeyId | Case::CreateOnMalformedKeyId => {
                "Error Codes (kms_02_8887) KMS.0205 Invalid key ID"
            }
            Case::CreateGrantAlone => {
                "Creating a Grant (kms_02_0028): create-grant cannot be the only value; Error Codes KMS.2401"
            }
            Case::InvalidGrantee => {
                "Creating a Grant (kms_02_0028) grantee_principal ^[a-zA-Z0-9]{1,64}$; Error Codes KMS.2402"
            }
            Case::InvalidName => {
                "Creating a Grant (kms_02_0028) name ^[a-zA-Z0-9:/_-]{1,255}$; Error Codes KMS.0308"
            }
            Case::LimitOutOfRange => {
                "Querying Grants on a CMK (kms_02_0031) limit (at most the grants a key holds, 100); Error Codes KMS.1601"
            }
            Case::WrongSecretKey => {
                "API Request Signing Guide; gateway error APIGW.0301 (its HTTP status 401 is the emulator's assumption)"
            }
            Case::UserQuotas => {
                "Querying the Quota of a User (kms_02_0025): grant_per_CMK quota 100"
            }
            Case::OperatorLifecycle => {
                "README, What happens when: create, adopt by name, replace (create, then revoke), delete"
            }
            Case::Throttling => {
                "API gateway throttling: 429 APIG.0308 (status assumed by the emulator), Retry-After"
            }
        }
    }

    pub(super) async fn run(self, kit: &Kit) -> Verdict {
        match self {
            Case::NameRoundTrip => name_round_trip(kit).await,
            Case::GrantFields => grant_fields(kit).await,
            Case::OperationsAsASet => operations_as_a_set(kit).await,
            Case::RetiringPrincipal => retiring_principal(kit).await,
            Case::DescribeKey => describe_key(kit).await,
            Case::Paging => paging(kit).await,
            Case::SameNameTwice => same_name_twice(kit).await,
            Case::RevokeAndList => revoke_and_list(kit).await,
            Case::RevokeAlreadyRevoked => revoke_already_revoked(kit).await,
            Case::RevokeUnknownGrant => {
                let result = kit
                    .kms(async || {
                        kit.client
                            .revoke_grant(kit.key(), &unknown_grant_id())
                            .await
                    })
                    .await;
                refused(result, 400, "KMS.2501")
            }
            Case::RevokeMalformedGrantId => {
                let result = kit
                    .kms(async || kit.client.revoke_grant(kit.key(), "xyz").await)
                    .await;
                refused(result, 400, "KMS.2501")
            }
            Case::RevokeOnUnknownKey => {
                let key = unknown_key_id();
                let result = kit
                    .kms(async || kit.client.revoke_grant(&key, &unknown_grant_id()).await)
                    .await;
                refused(result, 404, "KMS.0207")
            }
            Case::DescribeMalformedKeyId => {
                let result = kit
                    .kms(async || kit.client.describe_key("1234").await)
                    .await;
                refused(result.map(|info| info.key_id), 400, "KMS.0205")
            }
            Case::DescribeUnknownKey => {
                let key = unknown_key_id();
                let result = kit.kms(async || kit.client.describe_key(&key).await).await;
                refused(result.map(|info| info.key_id), 404, "KMS.0207")
            }
            Case::ListUnknownKey => {
                let key = unknown_key_id();
                let result = kit
                    .kms(async || kit.client.list_grants_page(&key, 10, None).await)
                    .await;
                refused(result.map(|page| page.grants.len()), 404, "KMS.0207")
            }
            Case::CreateOnUnknownKey => {
                let grant = NewGrant {
                    key_id: unknown_key_id(),
                    ..kit.grant(&kit.name(self.name()), &[Operation::DescribeKey], None)
                };
                refused(kit.create_grant(grant).await, 404, "KMS.0207")
            }
            Case::CreateOnMalformedKeyId => {
                let grant = NewGrant {
                    key_id: "not-a-key".into(),
                    ..kit.grant(&kit.name(self.name()), &[Operation::DescribeKey], None)
                };
                refused(kit.create_grant(grant).await, 400, "KMS.0205")
            }
            Case::CreateGrantAlone => {
                let grant = kit.grant(&kit.name(self.name()), &[Operation::CreateGrant], None);
                refused(kit.create_grant(grant).await, 400, "KMS.2401")
            }
            Case::InvalidGrantee => {
                let grant = NewGrant {
                    grantee_principal: "abc-123".into(),
                    ..kit.grant(&kit.name(self.name()), &[Operation::DescribeKey], None)
                };
                refused(kit.create_grant(grant).await, 400, "KMS.2402")
            }
            Case::InvalidName => {
                let name = format!("{} has spaces", kit.name(self.name()));
                let grant = kit.grant(&name, &[Operation::DescribeKey], None);
                refused(kit.create_grant(grant).await, 400, "KMS.0308")
            }
            Case::LimitOutOfRange => {
                let result = kit
                    .kms(async || kit.client.list_grants_page(kit.key(), 101, None).await)
                    .await;
                refused(result.map(|page| page.grants.len()), 400, "KMS.1601")
            }
            Case::WrongSecretKey => wrong_secret_key(kit).await,
            Case::UserQuotas => user_quotas(kit).await,
            Case::OperatorLifecycle => operator_lifecycle(kit).await,
            Case::Throttling => throttling(&kit.throttles()),
        }
    }
}

/// A well-formed key ID no account holds (random; 2^-120 odds of meeting one).
fn unknown_key_id() -> String {
    let hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(fastrand::u32(0..16), 16).expect("a hex digit"))
            .collect()
    };
    format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12))
}

/// A well-formed grant ID no key holds (random).
fn unknown_grant_id() -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// What the account answered to a failed call, for the report.
fn answer(err: &KmsError) -> String {
    match (err.status, &err.code) {
        (Some(status), Some(code)) => format!("HTTP {status} {code} ({})", err.message),
        (Some(status), None) => format!("HTTP {status} without an error code ({})", err.message),
        (None, _) => format!("no answer: {} ({})", err.reason.as_str(), err.message),
    }
}

/// A case that could not be carried out because `call` failed.
fn failed(what: &str, err: &KmsError) -> Verdict {
    Verdict::Error {
        message: format!("{what}: {err}; fix: {}", fix_for(err)),
    }
}

/// The call must be refused with this status and error code.
fn refused<T: std::fmt::Debug>(result: Result<T, KmsError>, status: u16, code: &str) -> Verdict {
    let expected = format!("HTTP {status} {code}");
    match result {
        Ok(answer) => Verdict::Differs {
            expected,
            got: format!("success ({answer:?})"),
            consequence: None,
        },
        Err(err) if err.status == Some(status) && err.code.as_deref() == Some(code) => {
            Verdict::Ok {
                message: format!("refused with {expected}"),
            }
        }
        // Not the account's answer to this request: an outage, a timeout, throttling to the end.
        Err(err) if err.status.is_none_or(|s| s >= 500 || s == 429) => {
            failed("the call got no usable answer", &err)
        }
        Err(err) => Verdict::Differs {
            expected,
            got: answer(&err),
            consequence: None,
        },
    }
}

fn differs(expected: impl Into<String>, got: impl Into<String>) -> Verdict {
    Verdict::Differs {
        expected: expected.into(),
        got: got.into(),
        consequence: None,
    }
}

async fn name_round_trip(kit: &Kit) -> Verdict {
    let name = kit.name("name-round-trip");
    let id = match kit.create(&name, &[Operation::DescribeKey], None).await {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    let verdict = match kit.list().await {
        Err(err) => failed("list-grants", &err),
        Ok(listed) => {
            let by_name = listed
                .iter()
                .filter(|g| g.name.as_deref() == Some(name.as_str()))
                .count();
            match listed.iter().find(|g| g.grant_id == id) {
                None => differs(
                    format!("grant {id}, just created, in list-grants"),
                    "list-grants does not return it",
                ),
                Some(grant) if grant.name.as_deref() != Some(name.as_str()) => Verdict::Differs {
                    expected: format!("grant {id} listed with name {name:?}"),
                    got: match &grant.name {
                        None => "it listed without a name".into(),
                        Some(other) => format!("it listed with name {other:?}"),
                    },
                    consequence: Some(NAMES_CONSEQUENCE.into()),
                },
                Some(_) if by_name != 1 => differs(
                    format!("one grant named {name:?}"),
                    format!("{by_name} grants listed with that name"),
                ),
                Some(_) => Verdict::Ok {
                    message: format!(
                        "created {name}; list-grants returns it with exactly that name"
                    ),
                },
            }
        }
    };
    kit.revoke_all(std::slice::from_ref(&id)).await;
    verdict
}

async fn grant_fields(kit: &Kit) -> Verdict {
    let name = kit.name("grant-fields");
    let id = match kit.create(&name, &[Operation::DescribeKey], None).await {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    let verdict = match kit.list().await {
        Err(err) => failed("list-grants", &err),
        Ok(listed) => match listed.iter().find(|g| g.grant_id == id) {
            None => differs(format!("grant {id} in list-grants"), "it is not listed"),
            Some(grant) => {
                let now_ms = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let mut wrong = Vec::new();
                if *grant.key_id != *kit.key() {
                    wrong.push(format!("key_id {:?}", grant.key_id));
                }
                if *grant.grantee_principal != *kit.account.principal {
                    wrong.push(format!("grantee_principal {:?}", grant.grantee_principal));
                }
                if grant.grantee_type() != "user" {
                    wrong.push(format!(
                        "grantee_principal_type {:?}",
                        grant.grantee_principal_type
                    ));
                }
                if grant.issuing_principal.is_none() {
                    wrong.push("no issuing_principal".into());
                }
                if grant.retiring_principal.is_some() {
                    wrong.push(format!(
                        "retiring_principal {:?} though none was asked for",
                        grant.retiring_principal
                    ));
                }
                match grant.created_at_millis {
                    Some(ms) if (ms - now_ms).abs() <= 15 * 60 * 1000 => {}
                    other => wrong.push(format!(
                        "creation_date {other:?} ms, not within 15 minutes of this machine's clock ({now_ms} ms)"
                    )),
                }
                if wrong.is_empty() {
                    Verdict::Ok {
                        message: format!(
                            "listed with its key, grantee (type {}), issuing principal and a creation date of now",
                            grant.grantee_type()
                        ),
                    }
                } else {
                    differs(
                        "the key, the grantee (type user or absent), an issuing principal, no retiring principal and a creation date of now",
                        wrong.join("; "),
                    )
                }
            }
        },
    };
    kit.revoke_all(std::slice::from_ref(&id)).await;
    verdict
}

async fn operations_as_a_set(kit: &Kit) -> Verdict {
    let sent = [
        Operation::EncryptDatakey,
        Operation::DescribeKey,
        Operation::CreateDatakey,
    ];
    let id = match kit
        .create(&kit.name("operations-as-a-set"), &sent, None)
        .await
    {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    let sent_set: std::collections::BTreeSet<&str> = sent.iter().map(|op| op.as_str()).collect();
    let verdict = match kit.list().await {
        Err(err) => failed("list-grants", &err),
        Ok(listed) => match listed.iter().find(|g| g.grant_id == id) {
            None => differs(format!("grant {id} in list-grants"), "it is not listed"),
            Some(grant) if grant.operation_set() == sent_set => Verdict::Ok {
                message: format!(
                    "sent {:?}, listed {:?}: the same set",
                    sent.iter().map(|op| op.as_str()).collect::<Vec<_>>(),
                    grant.operations
                ),
            },
            Some(grant) => differs(
                format!("the operations {sent_set:?} in any order"),
                format!("{:?}", grant.operations),
            ),
        },
    };
    kit.revoke_all(std::slice::from_ref(&id)).await;
    verdict
}

async fn retiring_principal(kit: &Kit) -> Verdict {
    let principal = kit.account.principal.clone();
    let id = match kit
        .create(
            &kit.name("retiring-principal"),
            &[Operation::DescribeKey],
            Some(&principal),
        )
        .await
    {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    let listed = match kit.list().await {
        Ok(listed) => listed,
        Err(err) => {
            kit.revoke_all(std::slice::from_ref(&id)).await;
            return failed("list-grants", &err);
        }
    };
    match listed.iter().find(|g| g.grant_id == id) {
        Some(grant) if grant.retiring_principal.as_deref() == Some(principal.as_str()) => {}
        Some(grant) => {
            kit.revoke_all(std::slice::from_ref(&id)).await;
            return differs(
                format!("retiring_principal {principal:?}"),
                format!("{:?}", grant.retiring_principal),
            );
        }
        None => {
            kit.revoke_all(std::slice::from_ref(&id)).await;
            return differs(format!("grant {id} in list-grants"), "it is not listed");
        }
    }
    let retired = kit
        .kms(async || kit.client.retire_grant(kit.key(), &id).await)
        .await;
    match retired {
        Ok(()) => kit.mark_revoked(&id),
        Err(err) if err.status.is_some_and(|s| s < 500 && s != 429) => {
            kit.revoke_all(std::slice::from_ref(&id)).await;
            return differs("retire-grant by the grantor succeeds", answer(&err));
        }
        Err(err) => {
            kit.revoke_all(std::slice::from_ref(&id)).await;
            return failed("retire-grant", &err);
        }
    }
    match kit.list().await {
        Err(err) => failed("list-grants after retire-grant", &err),
        Ok(listed) if listed.iter().any(|g| g.grant_id == id) => differs(
            "the retired grant gone from list-grants",
            "it is still listed",
        ),
        Ok(_) => Verdict::Ok {
            message:
                "listed with its retiring principal; retired by the grantor, then no longer listed"
                    .into(),
        },
    }
}

async fn describe_key(kit: &Kit) -> Verdict {
    let key = kit.key();
    let info = match kit.kms(async || kit.client.describe_key(key).await).await {
        Ok(info) => info,
        Err(err) => return failed("describe-key", &err),
    };
    let mut wrong = Vec::new();
    if info.key_id != key {
        wrong.push(format!("key_id {:?}", info.key_id));
    }
    if info.state != kmsgrant_kms::KeyState::Enabled {
        wrong.push(format!("key_state {:?}", info.state));
    }
    if info.default_key {
        wrong.push("default_key_flag \"1\"".into());
    }
    let alias = info
        .key_alias
        .strip_prefix("alias/")
        .unwrap_or(&info.key_alias)
        .to_owned();
    if !alias.is_empty() {
        let by_alias = format!("alias/{alias}");
        match kit
            .kms(async || kit.client.describe_key(&by_alias).await)
            .await
        {
            Ok(found) if found.key_id == key => {}
            Ok(found) => wrong.push(format!("{by_alias} describes key {}", found.key_id)),
            Err(err) => wrong.push(format!("describe-key {by_alias}: {}", answer(&err))),
        }
    }
    if wrong.is_empty() {
        Verdict::Ok {
            message: format!("key {key} enabled, a customer master key, the same by alias/{alias}"),
        }
    } else {
        differs(
            "the key's own ID, key_state \"2\" (enabled), default_key_flag \"0\", and the same key by alias/<alias>",
            wrong.join("; "),
        )
    }
}

async fn paging(kit: &Kit) -> Verdict {
    let mut ours = Vec::new();
    for i in 1..=3 {
        match kit
            .create(
                &kit.name(&format!("paging/{i}")),
                &[Operation::DescribeKey],
                None,
            )
            .await
        {
            Ok(id) => ours.push(id),
            Err(err) => {
                kit.revoke_all(&ours).await;
                return failed("create-grant", &err);
            }
        }
    }
    const LIMIT: u32 = 2;
    let mut problems = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut totals = Vec::new();
    let mut marker: Option<String> = None;
    let mut pages = 0;
    let max_pages = kmsgrant_kms::MAX_GRANTS_PER_KEY / LIMIT as usize + 2;
    let walked = loop {
        if pages >= max_pages {
            problems.push(format!("the listing went on past {max_pages} pages"));
            break Ok(());
        }
        let page = match kit
            .kms(async || {
                kit.client
                    .list_grants_page(kit.key(), LIMIT, marker.as_deref())
                    .await
            })
            .await
        {
            Ok(page) => page,
            Err(err) => break Err(err),
        };
        pages += 1;
        if page.grants.len() > LIMIT as usize {
            problems.push(format!(
                "page {pages} holds {} grants for limit {LIMIT}",
                page.grants.len()
            ));
        }
        if page.truncated == page.next_marker.is_empty() {
            problems.push(format!(
                "page {pages}: truncated {} with next_marker {:?}",
                page.truncated, page.next_marker
            ));
        }
        totals.extend(page.total);
        seen.extend(page.grants.iter().map(|g| g.grant_id.clone()));
        if !page.truncated || page.next_marker.is_empty() {
            break Ok(());
        }
        if marker.as_deref() == Some(page.next_marker.as_str()) {
            problems.push(format!(
                "page {pages} names marker {:?} again",
                page.next_marker
            ));
            break Ok(());
        }
        marker = Some(page.next_marker);
    };
    kit.revoke_all(&ours).await;
    if let Err(err) = walked {
        return failed("list-grants, one page at a time", &err);
    }
    for id in &ours {
        let times = seen.iter().filter(|s| *s == id).count();
        if times != 1 {
            problems.push(format!("grant {id} listed {times} times over the pages"));
        }
    }
    if let Some(total) = totals.iter().find(|t| **t as usize != seen.len()) {
        problems.push(format!("total {total} for {} grants listed", seen.len()));
    }
    if pages < 2 {
        problems.push(format!(
            "{} grants fit one page at limit {LIMIT}",
            seen.len()
        ));
    }
    if problems.is_empty() {
        Verdict::Ok {
            message: format!(
                "{} grants in {pages} pages of at most {LIMIT}; markers, truncated and total as documented",
                seen.len()
            ),
        }
    } else {
        differs(
            format!(
                "pages of at most {LIMIT} grants, truncated \"true\" with the next page's marker until the last (truncated \"false\", next_marker \"\"), total the key's grant count, each grant once"
            ),
            problems.join("; "),
        )
    }
}

async fn same_name_twice(kit: &Kit) -> Verdict {
    let name = kit.name("same-name-twice");
    let first = match kit.create(&name, &[Operation::DescribeKey], None).await {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    let second = kit.create(&name, &[Operation::DescribeKey], None).await;
    let verdict = match &second {
        Err(err) if err.status.is_some_and(|s| s < 500 && s != 429) => {
            differs("a second grant with the same name created", answer(err))
        }
        Err(err) => failed("the second create-grant", err),
        Ok(id) if *id == first => differs(
            "a second grant with its own ID",
            "the first grant's ID again",
        ),
        Ok(id) => match kit.list().await {
            Err(err) => failed("list-grants", &err),
            Ok(listed) => {
                let named: Vec<&str> = listed
                    .iter()
                    .filter(|g| g.name.as_deref() == Some(name.as_str()))
                    .map(|g| g.grant_id.as_str())
                    .collect();
                if named.contains(&first.as_str()) && named.contains(&id.as_str()) {
                    Verdict::Ok {
                        message: "both created and listed with the name: names are not unique (the operator keeps one of its own duplicates and revokes the rest)".into(),
                    }
                } else {
                    differs(
                        "both grants listed with the name",
                        format!("{} listed with it", named.len()),
                    )
                }
            }
        },
    };
    let mut ids = vec![first];
    ids.extend(second.ok());
    kit.revoke_all(&ids).await;
    verdict
}

async fn revoke_and_list(kit: &Kit) -> Verdict {
    let name = kit.name("revoke-and-list");
    let id = match kit.create(&name, &[Operation::DescribeKey], None).await {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    if let Err(err) = kit.revoke(&id).await {
        return match err.status {
            Some(status) if status < 500 && status != 429 => differs(
                "revoke-grant of a grant just created succeeds",
                answer(&err),
            ),
            _ => failed("revoke-grant", &err),
        };
    }
    match kit.list().await {
        Err(err) => failed("list-grants after revoke-grant", &err),
        Ok(listed)
            if listed
                .iter()
                .any(|g| g.grant_id == id || g.name.as_deref() == Some(name.as_str())) =>
        {
            differs(
                "the revoked grant gone from list-grants",
                "it is still listed",
            )
        }
        Ok(_) => Verdict::Ok {
            message: "revoked; list-grants no longer returns it".into(),
        },
    }
}

async fn revoke_already_revoked(kit: &Kit) -> Verdict {
    let id = match kit
        .create(
            &kit.name("revoke-already-revoked"),
            &[Operation::DescribeKey],
            None,
        )
        .await
    {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    if let Err(err) = kit.revoke(&id).await {
        return failed("the first revoke-grant", &err);
    }
    let again = kit
        .kms(async || kit.client.revoke_grant(kit.key(), &id).await)
        .await;
    match refused(again, 400, "KMS.2501") {
        Verdict::Differs { expected, got, .. } => Verdict::Differs {
            expected,
            got,
            consequence: Some(
                "the operator takes KMS.2501 (or 404 KMS.0207) on a revoke as \"already gone\"; another answer makes a deletion wait for a fresh list".into(),
            ),
        },
        other => other,
    }
}

async fn wrong_secret_key(kit: &Kit) -> Verdict {
    let config = client_config(&kit.account, "kmsgrant-live-test-not-the-secret-key");
    let client = match KmsClient::new(config) {
        Ok(client) => client,
        Err(err) => return failed("building a client", &err),
    };
    let result = kit
        .kms(async || client.list_grants_page(kit.key(), 1, None).await)
        .await;
    refused(result.map(|page| page.grants.len()), 401, "APIGW.0301")
}

async fn user_quotas(kit: &Kit) -> Verdict {
    match kit.kms(async || kit.client.user_quotas().await).await {
        Err(err) => failed("user-quotas", &err),
        Ok(quotas) => match quotas.grants_per_key {
            Some(quota) if quota.quota as usize == kmsgrant_kms::MAX_GRANTS_PER_KEY => {
                Verdict::Ok {
                    message: format!(
                        "grant_per_CMK quota {}, {} used on the fullest key",
                        quota.quota, quota.used
                    ),
                }
            }
            Some(quota) => Verdict::Differs {
                expected: format!("grant_per_CMK quota {}", kmsgrant_kms::MAX_GRANTS_PER_KEY),
                got: format!("quota {}", quota.quota),
                consequence: Some(
                    "the operator stops a list-grants walk past 100 grants and a page as a runaway listing (ListRunaway)".into(),
                ),
            },
            None => differs(
                "a grant_per_CMK resource",
                "user-quotas lists none",
            ),
        },
    }
}

/// The operator's lifecycle of one grant, as KMS sees it: create under an identity name; find
/// it again by that name alone (adoption); a spec change creates the new grant first and then
/// revokes the old; deletion revokes it.
async fn operator_lifecycle(kit: &Kit) -> Verdict {
    let name = kit.name("operator-lifecycle");
    let old = match kit.create(&name, &[Operation::DescribeKey], None).await {
        Ok(id) => id,
        Err(err) => return failed("create-grant", &err),
    };
    let mut ids = vec![old.clone()];
    let verdict = lifecycle_steps(kit, &name, &old, &mut ids).await;
    kit.revoke_all(&ids).await;
    verdict
}

async fn lifecycle_steps(kit: &Kit, name: &str, old: &str, ids: &mut Vec<String>) -> Verdict {
    let named = |listed: &[Grant]| -> Vec<String> {
        listed
            .iter()
            .filter(|g| g.name.as_deref() == Some(name))
            .map(|g| g.grant_id.clone())
            .collect()
    };
    let listed = match kit.list().await {
        Ok(listed) => listed,
        Err(err) => return failed("list-grants", &err),
    };
    if named(&listed) != [old] {
        return Verdict::Differs {
            expected: format!("the grant found by its name alone ({old})"),
            got: format!("grants named so: {:?}", named(&listed)),
            consequence: Some(NAMES_CONSEQUENCE.into()),
        };
    }
    let new = match kit
        .create(
            name,
            &[Operation::DescribeKey, Operation::CreateDatakey],
            None,
        )
        .await
    {
        Ok(id) => id,
        Err(err) => return failed("create-grant (the replacement)", &err),
    };
    ids.push(new.clone());
    if let Err(err) = kit.revoke(old).await {
        return failed("revoke-grant (the replaced grant)", &err);
    }
    match kit.list().await {
        Err(err) => return failed("list-grants", &err),
        Ok(listed) if named(&listed) != [new.clone()] => {
            return differs(
                format!("only the replacement {new} named so after the old grant's revoke"),
                format!("{:?}", named(&listed)),
            );
        }
        Ok(_) => {}
    }
    if let Err(err) = kit.revoke(&new).await {
        return failed("revoke-grant (deletion)", &err);
    }
    match kit.list().await {
        Err(err) => failed("list-grants", &err),
        Ok(listed) if !named(&listed).is_empty() => differs(
            "no grant named so after deletion",
            format!("{:?}", named(&listed)),
        ),
        Ok(_) => Verdict::Ok {
            message: "created, found by name, replaced (create then revoke), deleted".into(),
        },
    }
}

fn throttling(throttles: &[Throttled]) -> Verdict {
    if throttles.is_empty() {
        return Verdict::Skip {
            message: "no throttled answer during the run (the kit never provokes one)".into(),
        };
    }
    let seen: Vec<String> = throttles
        .iter()
        .map(|t| {
            format!(
                "{}: HTTP {} {}{}",
                t.call,
                t.status.map_or("-".into(), |s| s.to_string()),
                t.code.as_deref().unwrap_or("without an error code"),
                t.retry_after
                    .map(|r| format!(", Retry-After {} s", r.as_secs()))
                    .unwrap_or_default()
            )
        })
        .collect();
    let documented = throttles
        .iter()
        .all(|t| t.status == Some(429) && t.code.as_deref() == Some("APIG.0308"));
    if documented {
        Verdict::Ok {
            message: format!(
                "{} throttled answer(s), as assumed: {}",
                throttles.len(),
                seen.join("; ")
            ),
        }
    } else {
        differs("HTTP 429 APIG.0308", seen.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use kmsgrant_kms::ErrorReason;

    #[test]
    fn a_refusal_is_judged_by_status_and_code_and_an_outage_is_no_verdict() {
        use kmsgrant_kms::Call;
        let answered = |status: u16, code: &str| KmsError {
            status: Some(status),
            code: Some(code.into()),
            ..KmsError::new(
                Call::RevokeGrant,
                ErrorReason::GrantNotFound,
                "Invalid grant ID.",
            )
        };
        assert!(matches!(
            refused::<()>(Err(answered(400, "KMS.2501")), 400, "KMS.2501"),
            Verdict::Ok { .. }
        ));
        let Verdict::Differs { expected, got, .. } =
            refused::<()>(Err(answered(404, "KMS.0207")), 400, "KMS.2501")
        else {
            panic!("another code differs")
        };
        assert_eq!(expected, "HTTP 400 KMS.2501");
        assert!(got.starts_with("HTTP 404 KMS.0207"), "{got}");
        assert!(matches!(
            refused(Ok("grant"), 400, "KMS.2501"),
            Verdict::Differs { .. }
        ));
        assert!(matches!(
            refused::<()>(Err(answered(503, "KMS.0104")), 400, "KMS.2501"),
            Verdict::Error { .. }
        ));
    }

    #[test]
    fn throttling_is_skipped_unless_seen_and_judged_by_status_and_code() {
        assert!(matches!(throttling(&[]), Verdict::Skip { .. }));
        let seen = |status, code: &str| Throttled {
            call: "list-grants",
            status: Some(status),
            code: Some(code.into()),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert!(matches!(
            throttling(&[seen(429, "APIG.0308")]),
            Verdict::Ok { .. }
        ));
        let Verdict::Differs { got, .. } = throttling(&[seen(403, "APIGW.0308")]) else {
            panic!("a 403 differs")
        };
        assert!(
            got.contains("HTTP 403 APIGW.0308, Retry-After 2 s"),
            "{got}"
        );
    }

    #[test]
    fn every_case_has_its_own_name_and_a_document() {
        let names: std::collections::BTreeSet<&str> = Case::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Case::ALL.len());
        assert_eq!(Case::ALL[0], Case::NameRoundTrip, "grant identity first");
        assert!(Case::ALL.iter().all(|c| !c.documented().is_empty()));
    }
}
