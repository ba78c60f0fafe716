//! Shared helpers for the emulator tests: start an emulator in-process, call it with a token or
//! a signature, and read error codes of either body style.
#![allow(dead_code)]

use hmac::{Hmac, Mac};
use kms_emulator::{Emulator, EmulatorConfig, RunningEmulator};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const GRANTEE: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

pub struct Harness {
    pub emulator: RunningEmulator,
    pub http: reqwest::Client,
    /// A project-scoped token of the default user, obtained through `POST /v3/auth/tokens`.
    pub token: String,
}

/// An answer: status, body (JSON or `null`) and headers.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// `error_code` of the KMS body (`{"error": {...}}`) or the gateway's flat body.
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["error_code"]
            .as_str()
            .or_else(|| self.body["error_code"].as_str())
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(EmulatorConfig::for_tests()).await
    }

    pub async fn start_with(config: EmulatorConfig) -> Self {
        let emulator = Emulator::start(config).await.expect("emulator starts");
        let http = client_builder()
            .pool_max_idle_per_host(16)
            .build()
            .expect("client");
        let mut harness = Self {
            emulator,
            http,
            token: String::new(),
        };
        harness.token = harness
            .password_token(json!({"project": {"id": harness.project_id()}}))
            .await;
        harness
    }

    pub fn project_id(&self) -> String {
        self.emulator.config().project_id.clone()
    }

    pub fn kms_url(&self, action: &str) -> String {
        format!("{}/kms/{action}", self.emulator.kms_endpoint())
    }

    /// A token of the default user with the given `scope` object.
    pub async fn password_token(&self, scope: Value) -> String {
        let config = self.emulator.config();
        let answer = self
            .send(
                self.http
                    .post(format!("{}/auth/tokens", self.emulator.iam_endpoint()))
                    .json(&json!({
                        "auth": {
                            "identity": {"methods": ["password"], "password": {"user": {
                                "name": config.username, "password": config.password.as_str(),
                                "domain": {"name": config.domain_name}}}},
                            "scope": scope,
                        }
                    })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        answer.headers["x-subject-token"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request reaches the emulator");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Answer {
            status,
            body,
            headers,
        }
    }

    /// A KMS call with the default user's token.
    pub async fn kms(&self, action: &str, body: Value) -> Answer {
        self.kms_with_token(&self.token.clone(), action, body).await
    }

    pub async fn kms_with_token(&self, token: &str, action: &str, body: Value) -> Answer {
        self.send(
            self.http
                .post(self.kms_url(action))
                .header("X-Auth-Token", token)
                .json(&body),
        )
        .await
    }

    pub async fn create_key(&self, alias: &str) -> String {
        let answer = self.kms("create-key", json!({"key_alias": alias})).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.body["key_info"]["key_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn create_grant(&self, key_id: &str) -> String {
        let answer = self
            .kms("create-grant", json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]}))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.body["grant_id"].as_str().unwrap().to_owned()
    }

    pub async fn list_grants(&self, body: Value) -> Answer {
        self.kms("list-grants", body).await
    }

    /// Signs `request` as the default user (its access key and secret key), dated now.
    pub fn sign(&self, variant: &Variant, request: &ToSign) -> Signature {
        let secret_key = self.emulator.config().secret_key.as_str().to_owned();
        self.sign_with(variant, &secret_key, 0, request)
    }

    /// Signs `request` with the default user's access key and `secret_key`, dated
    /// `offset_seconds` from now (the bad-signature and clock-skew cases).
    pub fn sign_with(
        &self,
        variant: &Variant,
        secret_key: &str,
        offset_seconds: i64,
        request: &ToSign,
    ) -> Signature {
        let date = sdk_date(offset_seconds);
        let mut signed = request.headers.to_vec();
        signed.push(("x-sdk-date", &date));
        let authorization = sign(
            variant,
            &self.emulator.config().access_key,
            secret_key,
            request,
            &signed,
        );
        Signature {
            date,
            authorization,
        }
    }

    /// Signs `request` with any access key and secret key (a temporary one, say), dated now.
    pub fn sign_as(
        &self,
        variant: &Variant,
        access_key: &str,
        secret_key: &str,
        request: &ToSign,
    ) -> Signature {
        let date = sdk_date(0);
        let mut signed = request.headers.to_vec();
        signed.push(("x-sdk-date", &date));
        let authorization = sign(variant, access_key, secret_key, request, &signed);
        Signature {
            date,
            authorization,
        }
    }

    /// Sends `request`, signed as the default user and dated now, to the emulator. Of the headers
    /// the signature covers, only `x-sdk-date` is sent and `host` set by the HTTP client: a signed
    /// header not sent is what a test of that case wants.
    pub async fn send_signed(&self, variant: &Variant, request: &ToSign<'_>) -> Answer {
        let signature = self.sign(variant, request);
        let mut url = format!("{}{}", self.emulator.base_url(), request.path);
        if !request.query.is_empty() {
            url = format!("{url}?{}", request.query);
        }
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).expect("a method");
        let mut builder = signature.apply(self.http.request(method, url));
        if !request.body.is_empty() {
            builder = builder.body(request.body.to_vec());
        }
        self.send(builder).await
    }

    pub async fn shutdown(self) {
        self.emulator.shutdown().await;
    }
}

/// The parts of a request a signature covers.
pub struct ToSign<'a> {
    pub method: &'a str,
    /// Without characters to escape.
    pub path: &'a str,
    pub query: &'a str,
    /// Lowercase names and values of the signed headers besides `x-sdk-date`, which is always
    /// signed (e.g. `host`, the emulator's address).
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// A request's `X-Sdk-Date` and the `Authorization` signed over it.
pub struct Signature {
    pub date: String,
    pub authorization: String,
}

impl Signature {
    /// Sets both headers on `request`.
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request
            .header("x-sdk-date", &self.date)
            .header("authorization", &self.authorization)
    }
}

/// reqwest is built without a TLS provider; plain http needs none, but the builder wants one.
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// The Default Master Key with the given alias.
pub fn default_key_id(emulator: &RunningEmulator, alias: &str) -> String {
    emulator
        .admin()
        .dump()
        .keys
        .into_iter()
        .find(|key| key.key_alias == alias)
        .expect("default key")
        .key_id
}

// ---- an independent SDK-HMAC-SHA256 implementation, written from the published algorithm ----

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).unwrap();
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `yyyymmddThhmmssZ` for `offset_seconds` from now.
pub fn sdk_date(offset_seconds: i64) -> String {
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(offset_seconds);
    at.strftime("%Y%m%dT%H%M%SZ").to_string()
}

/// Which `Authorization` format to produce.
#[derive(Clone, Debug)]
pub enum Variant {
    /// `Access=<AK>`, key = SK.
    Huawei,
    /// `Credential=<AK>/<date>/<region>/<service>/sdk_request`, derived key.
    Otc { region: String, service: String },
}

/// The `Authorization` value of `request` (whose path has no characters to escape). `signed` are
/// the header names and values it covers (must include `x-sdk-date`), in any order.
fn sign(
    variant: &Variant,
    access_key: &str,
    secret_key: &str,
    request: &ToSign,
    signed: &[(&str, &str)],
) -> String {
    let ToSign {
        method,
        path,
        query,
        body,
        ..
    } = *request;
    let mut headers: Vec<(String, String)> = signed
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    headers.sort();
    let date = headers
        .iter()
        .find(|(n, _)| n == "x-sdk-date")
        .expect("x-sdk-date is signed")
        .1
        .clone();
    let uri = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort();
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    let canonical = [
        method,
        &uri,
        &pairs.join("&"),
        &canonical_headers,
        &names.join(";"),
        &sha256_hex(body),
    ]
    .join("\n");
    match variant {
        Variant::Huawei => {
            let to_sign = format!(
                "SDK-HMAC-SHA256\n{date}\n{}",
                sha256_hex(canonical.as_bytes())
            );
            format!(
                "SDK-HMAC-SHA256 Access={access_key}, SignedHeaders={}, Signature={}",
                names.join(";"),
                hex::encode(mac(secret_key.as_bytes(), &to_sign))
            )
        }
        Variant::Otc { region, service } => {
            let day = &date[..8];
            let scope = format!("{day}/{region}/{service}/sdk_request");
            let to_sign = format!(
                "SDK-HMAC-SHA256\n{date}\n{scope}\n{}",
                sha256_hex(canonical.as_bytes())
            );
            let key = mac(
                &mac(
                    &mac(&mac(format!("SDK{secret_key}").as_bytes(), day), region),
                    service,
                ),
                "sdk_request",
            );
            format!(
                "SDK-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={}, Signature={}",
                names.join(";"),
                hex::encode(mac(&key, &to_sign))
            )
        }
    }
}
