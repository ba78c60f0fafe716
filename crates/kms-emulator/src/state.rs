//! The emulated world: users, tokens, keys and grants, and the KMS operations on them.
//! Pure state transitions (the caller passes the time); the server holds it behind one mutex.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::errors::{ErrorCode, KmsError};
use super::validation::{self, KeyReference, Page};

/// Aliases of the Default Master Keys present from the start.
pub const DEFAULT_KEY_ALIASES: [&str; 2] = ["obs/default", "evs/default"];
/// Who "created" the Default Master Keys: nobody a client can act as.
pub const SYSTEM_PRINCIPAL: &str = "kmssystem";

/// `key_state` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    #[serde(rename = "1")]
    PendingActivation,
    #[serde(rename = "2")]
    Enabled,
    #[serde(rename = "3")]
    Disabled,
    #[serde(rename = "4")]
    PendingDeletion,
    #[serde(rename = "5")]
    PendingImport,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingActivation => "1",
            Self::Enabled => "2",
            Self::Disabled => "3",
            Self::PendingDeletion => "4",
            Self::PendingImport => "5",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "1" => Self::PendingActivation,
            "2" => Self::Enabled,
            "3" => Self::Disabled,
            "4" => Self::PendingDeletion,
            "5" => Self::PendingImport,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub key_id: String,
    pub domain_id: String,
    pub key_alias: String,
    pub realm: String,
    pub key_description: String,
    pub key_spec: String,
    pub key_usage: String,
    pub origin: String,
    pub creation_date_ms: u64,
    pub scheduled_deletion_date_ms: Option<u64>,
    pub key_state: KeyState,
    pub default_key: bool,
    /// The user ID of whoever created the key; only they may revoke its grants.
    pub creator: String,
}

impl Key {
    /// The `key_info` / `key_details` object of describe-key and list-keys.
    pub fn details(&self) -> Value {
        json!({
            "key_id": self.key_id,
            "domain_id": self.domain_id,
            "key_alias": self.key_alias,
            "realm": self.realm,
            "key_description": self.key_description,
            "key_spec": self.key_spec,
            "key_usage": self.key_usage,
            "creation_date": self.creation_date_ms.to_string(),
            "scheduled_deletion_date": self.scheduled_deletion_date_ms.map(|ms| ms.to_string()).unwrap_or_default(),
            "key_state": self.key_state.as_str(),
            "default_key_flag": if self.default_key { "1" } else { "0" },
            "key_type": "1",
            "expiration_time": "",
            "origin": self.origin,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub grant_id: String,
    pub key_id: String,
    pub grantee_principal: String,
    pub grantee_principal_type: String,
    /// In the order the client sent them; listed in another order.
    pub operations: Vec<String>,
    pub issuing_principal: String,
    pub name: Option<String>,
    pub retiring_principal: Option<String>,
    pub creation_date_ms: u64,
}

/// A grant as list-grants shows it, serialised straight from the stored grant.
/// Operations come back reversed, so clients that compare them as lists instead of sets fail
/// here as they may against the service.
#[derive(Serialize)]
struct ListedGrant<'a> {
    key_id: &'a str,
    grant_id: &'a str,
    grantee_principal: &'a str,
    grantee_principal_type: &'a str,
    #[serde(serialize_with = "reversed")]
    operations: &'a [String],
    issuing_principal: &'a str,
    creation_date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retiring_principal: Option<&'a str>,
}

fn reversed<S: serde::Serializer>(
    operations: &&[String],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(operations.iter().rev())
}

impl<'a> From<&'a Grant> for ListedGrant<'a> {
    fn from(grant: &'a Grant) -> Self {
        Self {
            key_id: &grant.key_id,
            grant_id: &grant.grant_id,
            grantee_principal: &grant.grantee_principal,
            grantee_principal_type: &grant.grantee_principal_type,
            operations: &grant.operations,
            issuing_principal: &grant.issuing_principal,
            creation_date: grant.creation_date_ms.to_string(),
            name: grant.name.as_deref(),
            retiring_principal: grant.retiring_principal.as_deref(),
        }
    }
}

/// An IAM user who can get tokens (password) and sign requests (access key). The emulator's
/// users are test fixtures, printed in its banner: their credentials are plain strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub user_id: String,
    /// The domain (account) the user belongs to: the emulator's own, or one added by the admin.
    pub domain_id: String,
    pub password: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

/// What a token is scoped to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenScope {
    Project(String),
    /// The domain of the token's user ([`IssuedToken::domain_id`]).
    Domain,
    /// No scope: a federated token without `auth.scope`. KMS refuses it (KMS.0305); it can be
    /// rescoped (`POST /v3/auth/tokens`, method `token`) or traded for temporary AK/SK.
    Unscoped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    pub user_id: String,
    pub scope: TokenScope,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The domain of the token's user (for an agency token, the delegating domain).
    pub domain_id: String,
    pub identity: TokenIdentity,
}

/// Who a token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenIdentity {
    /// An IAM user (password, or a token the admin issued).
    User,
    /// A federated (virtual) user mapped from an ID token.
    Federated(FederatedUser),
    /// An agency assumed by a user of the trusted domain.
    Agency(AssumedAgency),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederatedUser {
    pub idp_id: String,
    pub protocol_id: String,
    pub name: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumedAgency {
    pub agency_name: String,
    /// The delegated party's user, domain and their names.
    pub by_user_id: String,
    pub by_user_name: String,
    pub by_domain_id: String,
}

/// A domain (account) besides the emulator's own, added by the admin: the other party of an
/// agency. It has users but no project and no KMS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Domain {
    pub id: String,
    pub name: String,
}

/// An agency: `domain_id` (the delegating party) lets users of `trust_domain_id` act in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Agency {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub trust_domain_id: String,
}

/// A temporary access key (`POST /v3.0/OS-CREDENTIAL/securitytokens`): signs requests only
/// together with its security token, until it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemporaryCredential {
    pub secret: String,
    pub security_token: String,
    pub user_id: String,
    pub domain_id: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Fixed facts of the emulated account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub region: String,
    pub project_id: String,
    pub project_name: String,
    pub domain_id: String,
    pub domain_name: String,
    pub grants_per_key: usize,
    pub keys_per_project: usize,
}

/// Keys and grants as persisted to `--state-file` and shown by the state dump.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysAndGrants {
    pub keys: Vec<Key>,
    pub grants: Vec<Grant>,
}

/// Tokens are remembered this long after they expire, to answer them as expired.
const EXPIRED_TOKEN_MEMORY_MS: u64 = 3_600_000;
/// Most tokens held at once; the soonest to expire goes first.
const MAX_TOKENS: usize = 10_000;

/// The whole mutable world.
#[derive(Debug)]
pub struct World {
    pub account: Account,
    keys: Vec<Key>,
    key_index: HashMap<String, usize>,
    /// Grants per key, oldest first: the order list-grants pages through.
    grants: HashMap<String, Vec<Grant>>,
    /// grant_id -> key_id
    grant_index: HashMap<String, String>,
    /// grant_id -> the grant as list-grants shows it, serialised once at creation: a page is
    /// then a concatenation, so list-grants stays cheap while the lock is held.
    listed: HashMap<String, Box<str>>,
    users: Vec<User>,
    tokens: HashMap<String, IssuedToken>,
    /// Domains besides the account's own.
    domains: Vec<Domain>,
    agencies: Vec<Agency>,
    /// access key -> temporary credential
    credentials: HashMap<String, TemporaryCredential>,
    /// Identity providers, mappings, protocols and OpenID Connect configurations.
    pub federation: super::federation::Federation,
}

/// What an authenticated KMS caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
}

/// `bytes` random bytes as lowercase hex (`bytes` a multiple of 8).
pub fn random_hex(bytes: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes * 2);
    for _ in 0..bytes.div_ceil(8) {
        let _ = write!(out, "{:016x}", fastrand::u64(..));
    }
    out
}

/// 20 upper-case letters and digits, like an IAM access key ID.
fn random_access_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..20)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

fn new_key_id() -> String {
    let hex = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl World {
    pub fn new(account: Account, users: Vec<User>, now_ms: u64) -> Self {
        let mut world = Self {
            account,
            keys: Vec::new(),
            key_index: HashMap::new(),
            grants: HashMap::new(),
            grant_index: HashMap::new(),
            listed: HashMap::new(),
            users,
            tokens: HashMap::new(),
            domains: Vec::new(),
            agencies: Vec::new(),
            credentials: HashMap::new(),
            federation: Default::default(),
        };
        world.add_default_keys(now_ms);
        world
    }

    fn add_default_keys(&mut self, now_ms: u64) {
        for alias in DEFAULT_KEY_ALIASES {
            if !self.keys.iter().any(|key| key.key_alias == alias) {
                let key = self.new_key(None, alias, SYSTEM_PRINCIPAL, true, now_ms);
                self.insert_key(key);
            }
        }
    }

    fn new_key(
        &self,
        key_id: Option<String>,
        alias: &str,
        creator: &str,
        default_key: bool,
        now_ms: u64,
    ) -> Key {
        Key {
            key_id: key_id.unwrap_or_else(new_key_id),
            domain_id: self.account.domain_id.clone(),
            key_alias: alias.to_owned(),
            realm: self.account.region.clone(),
            key_description: if default_key {
                "Default Master Key".into()
            } else {
                String::new()
            },
            key_spec: "AES_256".into(),
            key_usage: "ENCRYPT_DECRYPT".into(),
            origin: "kms".into(),
            creation_date_ms: now_ms,
            scheduled_deletion_date_ms: None,
            key_state: KeyState::Enabled,
            default_key,
            creator: creator.to_owned(),
        }
    }

    fn insert_key(&mut self, key: Key) {
        self.key_index.insert(key.key_id.clone(), self.keys.len());
        self.grants.entry(key.key_id.clone()).or_default();
        self.keys.push(key);
    }

    /// Back to the start: only the Default Master Keys, no grants. Users and tokens stay.
    pub fn reset(&mut self, now_ms: u64) {
        self.clear_keys_and_grants();
        self.add_default_keys(now_ms);
    }

    fn clear_keys_and_grants(&mut self) {
        self.keys.clear();
        self.key_index.clear();
        self.grants.clear();
        self.grant_index.clear();
        self.listed.clear();
    }

    pub fn keys_and_grants(&self) -> KeysAndGrants {
        KeysAndGrants {
            keys: self.keys.clone(),
            grants: self
                .keys
                .iter()
                .flat_map(|key| self.grants[&key.key_id].iter().cloned())
                .collect(),
        }
    }

    /// Replaces keys and grants (loading a state file); Default Master Keys are added if missing.
    pub fn restore(&mut self, saved: KeysAndGrants, now_ms: u64) {
        self.clear_keys_and_grants();
        for key in saved.keys {
            self.insert_key(key);
        }
        for grant in saved.grants {
            if self.grants.contains_key(&grant.key_id) {
                self.insert_grant(grant);
            }
        }
        self.add_default_keys(now_ms);
    }

    // ---- IAM ----

    pub fn users(&self) -> &[User] {
        &self.users
    }

    pub fn add_user(&mut self, user: User) {
        self.users.retain(|existing| existing.name != user.name);
        self.users.push(user);
    }

    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|user| user.name == name)
    }

    pub fn user_by_id(&self, user_id: &str) -> Option<&User> {
        self.users.iter().find(|user| user.user_id == user_id)
    }

    pub fn user_by_access_key(&self, access_key: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|user| user.access_key.as_deref() == Some(access_key))
    }

    /// A token of an IAM user, in the user's domain (the account's when the user is unknown).
    pub fn issue_token(
        &mut self,
        user_id: &str,
        scope: TokenScope,
        now_ms: u64,
        ttl_ms: i64,
    ) -> (String, IssuedToken) {
        let domain_id = self
            .user_by_id(user_id)
            .map(|user| user.domain_id.clone())
            .unwrap_or_else(|| self.account.domain_id.clone());
        self.store_token(IssuedToken {
            user_id: user_id.to_owned(),
            scope,
            issued_at_ms: now_ms,
            expires_at_ms: (now_ms as i64 + ttl_ms).max(0) as u64,
            domain_id,
            identity: TokenIdentity::User,
        })
    }

    /// Stores a token made by the caller (federated, rescoped, agency) and returns its ID.
    pub fn store_token(&mut self, issued: IssuedToken) -> (String, IssuedToken) {
        let token = format!("MIIemulator{}", random_hex(48));
        self.prune_tokens(issued.issued_at_ms);
        self.tokens.insert(token.clone(), issued.clone());
        (token, issued)
    }

    // ---- domains, agencies, temporary credentials ----

    /// The account's own domain and the added ones.
    pub fn domains(&self) -> Vec<Domain> {
        let mut all = vec![Domain {
            id: self.account.domain_id.clone(),
            name: self.account.domain_name.clone(),
        }];
        all.extend(self.domains.iter().cloned());
        all
    }

    pub fn domain_by(&self, id: Option<&str>, name: Option<&str>) -> Option<Domain> {
        self.domains().into_iter().find(|domain| {
            id.is_some_and(|id| id == domain.id) || (id.is_none() && name == Some(&domain.name))
        })
    }

    pub fn add_domain(&mut self, domain: Domain) -> Result<Domain, String> {
        if self
            .domains()
            .iter()
            .any(|d| d.id == domain.id || d.name == domain.name)
        {
            return Err(format!(
                "a domain with ID {} or name {} exists",
                domain.id, domain.name
            ));
        }
        self.domains.push(domain.clone());
        Ok(domain)
    }

    pub fn agencies(&self) -> &[Agency] {
        &self.agencies
    }

    pub fn add_agency(&mut self, agency: Agency) -> Result<Agency, String> {
        for domain in [&agency.domain_id, &agency.trust_domain_id] {
            if self.domain_by(Some(domain), None).is_none() {
                return Err(format!("no domain {domain}"));
            }
        }
        if self
            .agencies
            .iter()
            .any(|a| a.domain_id == agency.domain_id && a.name == agency.name)
        {
            return Err(format!("agency {} exists in that domain", agency.name));
        }
        self.agencies.push(agency.clone());
        Ok(agency)
    }

    pub fn agency(&self, domain_id: &str, name: &str) -> Option<&Agency> {
        self.agencies
            .iter()
            .find(|a| a.domain_id == domain_id && a.name == name)
    }

    /// Stores a temporary credential and returns its access key.
    pub fn issue_credential(&mut self, credential: TemporaryCredential) -> String {
        let access = random_access_key();
        let now_ms = credential.issued_at_ms;
        self.credentials
            .retain(|_, c| c.expires_at_ms.saturating_add(EXPIRED_TOKEN_MEMORY_MS) > now_ms);
        while self.credentials.len() >= MAX_TOKENS {
            let Some(first) = self
                .credentials
                .iter()
                .min_by_key(|(_, c)| (c.expires_at_ms, c.issued_at_ms))
                .map(|(access, _)| access.clone())
            else {
                break;
            };
            self.credentials.remove(&first);
        }
        self.credentials.insert(access.clone(), credential);
        access
    }

    pub fn credential(&self, access: &str) -> Option<&TemporaryCredential> {
        self.credentials.get(access)
    }

    /// Forgets tokens that expired more than [`EXPIRED_TOKEN_MEMORY_MS`] ago (until then they are
    /// answered as expired, KMS.0303, not as unknown), and keeps at most [`MAX_TOKENS`] - 1 so
    /// the next fits: a client logging in in a loop cannot grow the map without bound.
    fn prune_tokens(&mut self, now_ms: u64) {
        self.tokens
            .retain(|_, t| t.expires_at_ms.saturating_add(EXPIRED_TOKEN_MEMORY_MS) > now_ms);
        while self.tokens.len() >= MAX_TOKENS {
            let Some(first) = self
                .tokens
                .iter()
                .min_by_key(|(_, t)| (t.expires_at_ms, t.issued_at_ms))
                .map(|(token, _)| token.clone())
            else {
                break;
            };
            self.tokens.remove(&first);
        }
    }

    pub fn token(&self, token: &str) -> Option<&IssuedToken> {
        self.tokens.get(token)
    }

    // ---- admin helpers ----

    /// Creates a key with a chosen ID, alias, creator, state and default flag (tests set up worlds).
    pub fn admin_create_key(
        &mut self,
        key_id: Option<String>,
        alias: &str,
        creator: &str,
        key_state: KeyState,
        default_key: bool,
        now_ms: u64,
    ) -> Result<Key, String> {
        if let Some(id) = &key_id {
            if !validation::is_key_id(id) {
                return Err(format!("{id:?} is not a key ID"));
            }
            if self.key_index.contains_key(id) {
                return Err(format!("key {id} exists"));
            }
        }
        if !validation::is_name(alias) || self.keys.iter().any(|key| key.key_alias == alias) {
            return Err(format!("alias {alias:?} is invalid or taken"));
        }
        let mut key = self.new_key(key_id, alias, creator, default_key, now_ms);
        key.key_state = key_state;
        self.insert_key(key.clone());
        Ok(key)
    }

    pub fn admin_set_key_state(
        &mut self,
        key_id: &str,
        key_state: KeyState,
        now_ms: u64,
    ) -> Option<Key> {
        let key = self.key_mut(key_id)?;
        key.key_state = key_state;
        key.scheduled_deletion_date_ms =
            (key_state == KeyState::PendingDeletion).then(|| now_ms + 7 * 86_400_000);
        Some(key.clone())
    }

    pub fn grant_count(&self, key_id: &str) -> Option<usize> {
        self.grants.get(key_id).map(Vec::len)
    }

    pub fn grant_counts(&self) -> Vec<(String, usize)> {
        self.keys
            .iter()
            .map(|key| (key.key_id.clone(), self.grants[&key.key_id].len()))
            .collect()
    }

    /// Removes a grant without any permission check, as another actor would.
    pub fn admin_remove_grant(&mut self, grant_id: &str) -> Option<Grant> {
        let key_id = self.grant_index.remove(grant_id)?;
        self.listed.remove(grant_id);
        let grants = self.grants.get_mut(&key_id)?;
        let position = grants.iter().position(|grant| grant.grant_id == grant_id)?;
        Some(grants.remove(position))
    }

    // ---- KMS ----

    fn key(&self, key_id: &str) -> Option<&Key> {
        self.key_index.get(key_id).map(|&index| &self.keys[index])
    }

    fn key_mut(&mut self, key_id: &str) -> Option<&mut Key> {
        self.key_index
            .get(key_id)
            .copied()
            .map(move |index| &mut self.keys[index])
    }

    fn existing_key(&self, key_id: &str) -> Result<&Key, KmsError> {
        self.key(key_id).ok_or(KmsError(ErrorCode::KeyNotFound))
    }

    /// A customer key that may change state: not a Default Master Key.
    fn customer_key_mut(&mut self, key_id: &str) -> Result<&mut Key, KmsError> {
        let key = self
            .key_mut(key_id)
            .ok_or(KmsError(ErrorCode::KeyNotFound))?;
        if key.default_key {
            return Err(ErrorCode::DefaultMasterKey.into());
        }
        Ok(key)
    }

    pub fn create_key(
        &mut self,
        caller: &Caller,
        request: validation::CreateKey,
        now_ms: u64,
    ) -> Result<Value, KmsError> {
        if self
            .keys
            .iter()
            .any(|key| key.key_alias == request.key_alias)
        {
            return Err(ErrorCode::DuplicateAlias.into());
        }
        if self.keys.iter().filter(|key| !key.default_key).count() >= self.account.keys_per_project
        {
            return Err(ErrorCode::TooManyKeys.into());
        }
        let mut key = self.new_key(None, &request.key_alias, &caller.user_id, false, now_ms);
        key.key_spec = request.key_spec;
        key.key_usage = request.key_usage;
        key.key_description = request.key_description;
        key.origin = request.origin;
        if key.origin == "external" {
            key.key_state = KeyState::PendingImport;
        }
        let answer = json!({"key_info": {"key_id": key.key_id, "domain_id": key.domain_id}});
        self.insert_key(key);
        Ok(answer)
    }

    pub fn describe_key(&self, reference: &KeyReference) -> Result<Value, KmsError> {
        let key = match reference {
            KeyReference::Id(key_id) => self.key(key_id),
            KeyReference::Alias(alias) => self.keys.iter().find(|key| &key.key_alias == alias),
            KeyReference::Urn {
                region,
                domain_id,
                alias,
            } => self.keys.iter().find(|key| {
                &key.key_alias == alias
                    && region == &self.account.region
                    && domain_id == &self.account.domain_id
            }),
        };
        let key = key.ok_or(KmsError(ErrorCode::KeyNotFound))?;
        Ok(json!({"key_info": key.details()}))
    }

    /// `update-key-alias`. A Default Master Key keeps its alias (KMS.0211), a key pending
    /// deletion too (KMS.0210, the state error the API pages use for that state); an alias another
    /// key holds is refused like at create-key (KMS.1104). Setting a key's own alias again
    /// succeeds and changes nothing (our choice: the pages are silent).
    pub fn update_key_alias(
        &mut self,
        request: &validation::UpdateKeyAlias,
    ) -> Result<Value, KmsError> {
        let key = self.existing_key(&request.key_id)?;
        if key.default_key {
            return Err(ErrorCode::DefaultMasterKey.into());
        }
        if key.key_state == KeyState::PendingDeletion {
            return Err(ErrorCode::KeyPendingDeletion.into());
        }
        if self
            .keys
            .iter()
            .any(|other| other.key_alias == request.key_alias && other.key_id != request.key_id)
        {
            return Err(ErrorCode::DuplicateAlias.into());
        }
        let key = self.customer_key_mut(&request.key_id)?;
        key.key_alias.clone_from(&request.key_alias);
        Ok(json!({"key_info": {"key_id": key.key_id, "key_alias": key.key_alias}}))
    }

    pub fn list_keys(&self, request: &validation::ListKeys) -> Value {
        let matching: Vec<&Key> = self
            .keys
            .iter()
            .filter(|key| {
                request
                    .key_state
                    .as_deref()
                    .is_none_or(|state| state == key.key_state.as_str())
            })
            .collect();
        let (page, next_marker, truncated) = paginate(&matching, request.page);
        json!({
            "keys": page.iter().map(|key| key.key_id.clone()).collect::<Vec<_>>(),
            "key_details": page.iter().map(|key| key.details()).collect::<Vec<_>>(),
            "next_marker": next_marker,
            "truncated": truncated,
            "total": matching.len(),
        })
    }

    pub fn enable_key(&mut self, key_id: &str) -> Result<Value, KmsError> {
        let key = self.customer_key_mut(key_id)?;
        match key.key_state {
            KeyState::Disabled => key.key_state = KeyState::Enabled,
            KeyState::PendingDeletion => return Err(ErrorCode::KeyPendingDeletion.into()),
            _ => return Err(ErrorCode::KeyNotDisabled.into()),
        }
        Ok(json!({"key_info": {"key_id": key.key_id, "key_state": key.key_state.as_str()}}))
    }

    pub fn disable_key(&mut self, key_id: &str) -> Result<Value, KmsError> {
        let key = self.customer_key_mut(key_id)?;
        match key.key_state {
            KeyState::Enabled => key.key_state = KeyState::Disabled,
            KeyState::PendingDeletion => return Err(ErrorCode::KeyPendingDeletion.into()),
            _ => return Err(ErrorCode::KeyNotEnabled.into()),
        }
        Ok(json!({"key_info": {"key_id": key.key_id, "key_state": key.key_state.as_str()}}))
    }

    pub fn schedule_key_deletion(
        &mut self,
        request: &validation::ScheduleKeyDeletion,
        now_ms: u64,
    ) -> Result<Value, KmsError> {
        let key = self.customer_key_mut(&request.key_id)?;
        if key.key_state == KeyState::PendingDeletion {
            return Err(ErrorCode::KeyAlreadyPendingDeletion.into());
        }
        key.key_state = KeyState::PendingDeletion;
        key.scheduled_deletion_date_ms =
            Some(now_ms + u64::from(request.pending_days) * 86_400_000);
        Ok(json!({"key_id": key.key_id, "key_state": key.key_state.as_str()}))
    }

    pub fn cancel_key_deletion(&mut self, key_id: &str) -> Result<Value, KmsError> {
        let key = self.customer_key_mut(key_id)?;
        if key.key_state != KeyState::PendingDeletion {
            return Err(ErrorCode::KeyNotPendingDeletion.into());
        }
        key.key_state = KeyState::Disabled;
        key.scheduled_deletion_date_ms = None;
        Ok(json!({"key_id": key.key_id, "key_state": key.key_state.as_str()}))
    }

    pub fn create_grant(
        &mut self,
        caller: &Caller,
        request: validation::CreateGrant,
        now_ms: u64,
    ) -> Result<Value, KmsError> {
        let key = self.existing_key(&request.key_id)?;
        if key.default_key {
            return Err(ErrorCode::DefaultMasterKey.into());
        }
        match key.key_state {
            KeyState::Enabled => {}
            KeyState::Disabled => return Err(ErrorCode::KeyDisabled.into()),
            KeyState::PendingDeletion => return Err(ErrorCode::KeyPendingDeletion.into()),
            KeyState::PendingActivation | KeyState::PendingImport => {
                return Err(ErrorCode::KeyNotEnabled.into());
            }
        }
        if self.grants.get(&request.key_id).map_or(0, Vec::len) >= self.account.grants_per_key {
            return Err(ErrorCode::TooManyKeyGrants.into());
        }
        let grant = Grant {
            grant_id: random_hex(32),
            key_id: request.key_id,
            grantee_principal: request.grantee_principal,
            grantee_principal_type: request.grantee_principal_type,
            operations: request.operations,
            issuing_principal: caller.user_id.clone(),
            name: request.name,
            retiring_principal: request.retiring_principal,
            creation_date_ms: now_ms,
        };
        let answer = json!({"grant_id": grant.grant_id});
        self.insert_grant(grant);
        Ok(answer)
    }

    fn insert_grant(&mut self, grant: Grant) {
        let listed = serde_json::to_string(&ListedGrant::from(&grant)).expect("a grant serialises");
        self.listed
            .insert(grant.grant_id.clone(), listed.into_boxed_str());
        self.grant_index
            .insert(grant.grant_id.clone(), grant.key_id.clone());
        self.grants
            .entry(grant.key_id.clone())
            .or_default()
            .push(grant);
    }

    /// The page as JSON bytes: serialised while the state is borrowed, without an
    /// intermediate JSON tree, because list-grants is the hot call of every reconcile.
    pub fn list_grants(&self, request: &validation::ListGrants) -> Result<Vec<u8>, KmsError> {
        self.existing_key(&request.key_id)?;
        let grants: Vec<&Grant> = self.grants[&request.key_id].iter().collect();
        Ok(self.grant_page(&grants, request.page))
    }

    /// Grants the caller may retire: it is the retiring principal, or a grantee holding retire-grant.
    pub fn list_retirable_grants(&self, caller: &Caller, page: Page) -> Vec<u8> {
        let grants: Vec<&Grant> = self
            .keys
            .iter()
            .flat_map(|key| self.grants[&key.key_id].iter())
            .filter(|grant| {
                grant.retiring_principal.as_deref() == Some(caller.user_id.as_str())
                    || (grant.grantee_principal == caller.user_id
                        && grant.operations.iter().any(|op| op == "retire-grant"))
            })
            .collect();
        self.grant_page(&grants, page)
    }

    /// The grant `request` names, checked against its key: unknown or already removed grants are
    /// KMS.2501, a grant of another key KMS.2502.
    fn grant_on_key(&self, request: &validation::GrantOnKey) -> Result<&Grant, KmsError> {
        let key = self.existing_key(&request.key_id)?;
        if key.default_key {
            return Err(ErrorCode::DefaultMasterKey.into());
        }
        let owner = self
            .grant_index
            .get(&request.grant_id)
            .ok_or(KmsError(ErrorCode::InvalidGrantId))?;
        if owner != &request.key_id {
            return Err(ErrorCode::GrantKeyMismatch.into());
        }
        self.grants[owner]
            .iter()
            .find(|grant| grant.grant_id == request.grant_id)
            .ok_or(KmsError(ErrorCode::InvalidGrantId))
    }

    /// Only the key's creator may revoke.
    pub fn revoke_grant(
        &mut self,
        caller: &Caller,
        request: &validation::GrantOnKey,
    ) -> Result<Value, KmsError> {
        self.grant_on_key(request)?;
        if self.existing_key(&request.key_id)?.creator != caller.user_id {
            return Err(ErrorCode::NoPermission.into());
        }
        self.admin_remove_grant(&request.grant_id);
        Ok(json!({}))
    }

    /// The grantor, the retiring principal, or a grantee holding retire-grant may retire.
    pub fn retire_grant(
        &mut self,
        caller: &Caller,
        request: &validation::GrantOnKey,
    ) -> Result<Value, KmsError> {
        let grant = self.grant_on_key(request)?;
        let me = caller.user_id.as_str();
        let allowed = grant.issuing_principal == me
            || grant.retiring_principal.as_deref() == Some(me)
            || (grant.grantee_principal == me
                && grant.operations.iter().any(|op| op == "retire-grant"));
        if !allowed {
            return Err(ErrorCode::NoPermission.into());
        }
        self.admin_remove_grant(&request.grant_id);
        Ok(json!({}))
    }

    /// `{"grants": [...], "next_marker", "truncated", "total"}` from the pre-serialised grants.
    fn grant_page(&self, grants: &[&Grant], page: Page) -> Vec<u8> {
        use std::io::Write;
        let (slice, next_marker, truncated) = paginate(grants, page);
        let mut out = Vec::with_capacity(80 + slice.len() * 480);
        out.extend_from_slice(b"{\"grants\":[");
        for (i, grant) in slice.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match self.listed.get(&grant.grant_id) {
                Some(listed) => out.extend_from_slice(listed.as_bytes()),
                None => serde_json::to_writer(&mut out, &ListedGrant::from(*grant))
                    .expect("a grant serialises"),
            }
        }
        // next_marker is a decimal offset or empty: nothing to escape.
        let _ = write!(
            out,
            "],\"next_marker\":\"{next_marker}\",\"truncated\":\"{truncated}\",\"total\":{}}}",
            grants.len()
        );
        out
    }

    /// `grant_per_CMK.used` is the largest number of grants on any one key.
    pub fn user_quotas(&self) -> Value {
        let customer_keys = self.keys.iter().filter(|key| !key.default_key).count();
        let most_grants = self.grants.values().map(Vec::len).max().unwrap_or(0);
        json!({"quotas": {"resources": [
            {"type": "CMK", "used": customer_keys, "quota": self.account.keys_per_project},
            {"type": "grant_per_CMK", "used": most_grants, "quota": self.account.grants_per_key},
        ]}})
    }
}

/// The slice of `items` for `page`, the next marker (`""` on the last page) and `truncated`.
fn paginate<T>(items: &[T], page: Page) -> (&[T], String, &'static str) {
    let start = page.offset.min(items.len());
    let end = start.saturating_add(page.limit).min(items.len());
    if end < items.len() {
        (&items[start..end], end.to_string(), "true")
    } else {
        (&items[start..end], String::new(), "false")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        let account = Account {
            region: "eu-de".into(),
            project_id: "p".into(),
            project_name: "eu-de".into(),
            domain_id: "d".into(),
            domain_name: "acme".into(),
            grants_per_key: 100,
            keys_per_project: 100,
        };
        World::new(account, Vec::new(), 0)
    }

    #[test]
    fn the_token_map_forgets_long_expired_tokens_and_stays_bounded() {
        let mut world = world();
        let scope = || TokenScope::Project("p".into());
        let (old, _) = world.issue_token("u", scope(), 0, 1000);
        // Expired, but recently: still known, so it is answered as expired.
        let (_, _) = world.issue_token("u", scope(), 2000, 1000);
        assert!(world.token(&old).is_some());
        // Long expired: forgotten at the next login.
        world.issue_token("u", scope(), 1000 + EXPIRED_TOKEN_MEMORY_MS + 1, 1000);
        assert!(world.token(&old).is_none());
        assert_eq!(world.tokens.len(), 2);
        // A login loop of valid tokens is capped.
        let now = 10 * EXPIRED_TOKEN_MEMORY_MS;
        for i in 0..(MAX_TOKENS as u64 + 50) {
            world.issue_token("u", scope(), now + i, 86_400_000);
        }
        assert_eq!(world.tokens.len(), MAX_TOKENS);
    }
}
