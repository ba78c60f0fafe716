//! What to do about a failed KMS or IAM call: one text per reason, shared by conditions, events
//! and `kmsgrant-operator check`.

use kmsgrant_kms::{ErrorReason, KmsError};

/// What to do about a failed call: the fix a platform engineer would look for.
pub fn fix_for(err: &KmsError) -> String {
    use ErrorReason::*;
    let fallback = match err.reason {
        IdentityProviderNotFound
        | IdentityTokenRefused
        | IdentityTokenExpired
        | IdentityTokenUnavailable
        | AgencyNotAssumable => "see the table in docs/keyless.md, section 5",
        InvalidConfiguration => "fix the provider config as the message says",
        ServiceUnavailable | Throttled => {
            "the cloud is failing or throttling right now: try again later"
        }
        _ => "see the message",
    };
    fix_for_reason(err.reason).unwrap_or(fallback).to_owned()
}

/// The fix a failure reason calls for, when there is one to name.
pub fn fix_for_reason(reason: ErrorReason) -> Option<&'static str> {
    use ErrorReason::*;
    let text = match reason {
        ConnectionFailed => {
            "check the provider config's spec.endpoint / spec.iamEndpoint (https://kms.<region>.otc.t-systems.com, https://kms.<region>.myhuaweicloud.com), DNS and the egress path (proxy, NetworkPolicy); for a private CA set spec.caBundle"
        }
        Timeout => {
            "the endpoint does not answer in time: check the egress path and the endpoint's region"
        }
        AddressNotAllowed => {
            "a tenant's endpoint may reach only public addresses (and networks the platform allows with --tenant-allowed-networks): use the cloud's public endpoint"
        }
        RedirectRefused => {
            "set the endpoint to the URL the redirect names (the operator never follows redirects with credentials)"
        }
        InvalidCredentials => {
            "the credentials are refused: check the AK/SK or password in the Secret (and that the user is enabled), or the signing variant (spec.auth.signingVariant: OpenTelekomCloud on Open Telekom Cloud)"
        }
        TokenRejected => {
            "the token was refused: check the user and that it is allowed into the project"
        }
        ClockSkew => {
            "synchronise the clocks with NTP: signatures more than 15 minutes off are refused"
        }
        PermissionDenied => {
            "the identity lacks a KMS permission: give it the least-privilege policy of docs/keyless.md (kms:cmk:get, kms:cmk:getQuota, kms:grant:create/list/revoke/retire) in this project; only a key's creator may revoke its grants"
        }
        WrongProject => {
            "the project does not match: the provider config's projectId / projectName must name the project the keys live in (a key of another project or region is not found)"
        }
        KeyNotFound => {
            "no such key in this project: check the key ID, and that the provider config's projectId / region are the key's (keys live in one project of one region)"
        }
        DefaultKeyNotGrantable => {
            "default master keys (alias suffix /default) cannot be granted: use a customer master key"
        }
        GrantQuotaExceeded => {
            "the key holds 100 grants: revoke unused ones (kubectl get kmskp shows who holds them) or use another key"
        }
        // Their messages say what to fix already.
        _ => return None,
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Outcome;
    use kmsgrant_kms::Call;

    #[test]
    fn a_terminal_failure_condition_names_the_fix_and_a_transient_one_does_not() {
        let denied = KmsError::new(
            Call::CreateGrant,
            ErrorReason::PermissionDenied,
            "No access permissions.",
        );
        let Outcome::Stalled { reason, message } =
            crate::controller::plan::failure_outcome(&denied)
        else {
            panic!("PermissionDenied is Stalled");
        };
        assert_eq!(reason, "PermissionDenied");
        assert!(
            message.contains("; fix: the identity lacks a KMS permission"),
            "{message}"
        );

        let skew = KmsError::new(Call::ListGrants, ErrorReason::ClockSkew, "request expired");
        assert!(
            crate::controller::plan::failure_outcome(&skew)
                .message()
                .contains("NTP")
        );

        let blip = KmsError::new(Call::ListGrants, ErrorReason::ServiceUnavailable, "busy");
        assert!(
            !crate::controller::plan::failure_outcome(&blip)
                .message()
                .contains("fix:")
        );
        let refused = KmsError::new(
            Call::IamIdToken,
            ErrorReason::IdentityTokenRefused,
            "IAM refused",
        );
        assert!(
            !crate::controller::plan::failure_outcome(&refused)
                .message()
                .contains("fix:")
        );
        assert!(fix_for(&refused).contains("docs/keyless.md"));
    }
}
