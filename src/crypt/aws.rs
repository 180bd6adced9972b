//! A client of the AWS KMS API: GenerateDataKey and Decrypt, against AWS itself or any compatible
//! KMS (LocalStack, moto), over the operator's own HTTP client (hyper + rustls with the system's
//! roots) and a hand-written AWS Signature Version 4 signer (the `aws-sigv4` crate brings the
//! smithy runtime along).
//!
//! The protocol: `POST /` with `Content-Type: application/x-amz-json-1.1`, `X-Amz-Target:
//! TrentService.<Operation>` and a JSON body (blobs in base64), signed for the service `kms`.
//! A refusal is a 4xx answer with a JSON body `{"__type": "...", "message": "..."}`; moto answers
//! authentication failures (bad signature, unknown access key, IAM denial) with an XML body
//! instead, which is read too.

use std::{fmt, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use ring::hmac;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Longest wait for a TCP (and TLS) connection to the KMS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a whole exchange with the KMS, its answer read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: a KMS answer is a few hundred bytes.
const MAX_ANSWER: usize = 64 * 1024;
/// The content type of the KMS API (AWS JSON 1.1).
const JSON_1_1: &str = "application/x-amz-json-1.1";

/// Credentials for the AWS KMS API.
#[derive(Clone)]
pub struct Credentials {
    /// The access key id (`AKIA...`, or `ASIA...` with a session token).
    pub access_key_id: String,
    /// The secret access key: signs requests, is never sent nor printed.
    pub secret_access_key: String,
    /// The session token of temporary credentials (STS), sent as `x-amz-security-token`.
    pub session_token: Option<String>,
}

/// Prints the access key id only: the secret and the session token are redacted.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why a KMS call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AwsError {
    /// The KMS answered and refused: the key is missing, disabled, pending deletion, access
    /// denied, or the ciphertext is not one this key made (NotFoundException, DisabledException,
    /// KMSInvalidStateException, AccessDeniedException, InvalidCiphertextException,
    /// IncorrectKeyException, InvalidKeyUsageException, ValidationException, a bad signature or
    /// unknown access key...), or the client is misconfigured (an endpoint that is not an http(s)
    /// URL). The message names the key and the KMS's own error type and message, and says what
    /// to do. Retrying the same call will not help.
    #[error("{0}")]
    Refused(String),
    /// Could not get an answer (connection, timeout, 5xx, throttling, KeyUnavailableException,
    /// unreadable answer): retrying may help.
    #[error("{0}")]
    Transient(String),
}

/// A client of one AWS KMS API endpoint (AWS, or any compatible one: moto, LocalStack...).
/// Cloning is cheap: clones share one connection pool.
#[derive(Clone)]
pub struct AwsKms {
    inner: Arc<Inner>,
}

struct Inner {
    /// The endpoint as configured, for messages.
    endpoint: String,
    /// Where requests go: the endpoint's `scheme://authority/`.
    uri: http::Uri,
    /// The `Host` header (signed): the endpoint's authority.
    host: String,
    /// The signing region.
    region: String,
    credentials: Credentials,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Prints where and as whom, never the secret key or the session token.
impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("endpoint", &self.inner.endpoint)
            .field("region", &self.inner.region)
            .field("credentials", &self.inner.credentials)
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// A client of the KMS at `endpoint` (e.g. `https://kms.eu-west-1.amazonaws.com` or
    /// `http://127.0.0.1:5000`; https trusts the system's roots), signing for `region` (e.g.
    /// `eu-west-1`). Refused for an endpoint that is not an http(s) URL of the form
    /// `scheme://host[:port][/]`, an empty region, credentials that cannot be sent in a header,
    /// or an https endpoint on a system without root certificates.
    pub fn new(endpoint: &str, region: &str, credentials: Credentials) -> Result<AwsKms, AwsError> {
        let invalid = |why: &str| {
            AwsError::Refused(format!(
                "the KMS endpoint {endpoint:?} {why}: use http(s)://host[:port], for example \
                 https://kms.{region}.amazonaws.com"
            ))
        };
        let uri: http::Uri = endpoint.parse().map_err(|_| invalid("is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid("is not an http or https URL")),
        };
        let authority = match uri.authority() {
            Some(a) if a.as_str().contains('@') => {
                // Not echoed: what precedes the @ may be a password.
                return Err(AwsError::Refused(
                    "the KMS endpoint has user information (user@ or user:password@): use http(s)://host[:port] \
                     and give the credentials separately"
                        .into(),
                ));
            }
            Some(a) if !a.host().is_empty() => a.clone(),
            _ => return Err(invalid("has no host")),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid("has a path or a query (the KMS API is served at /)"));
        }
        if region.is_empty() {
            return Err(AwsError::Refused(format!(
                "no signing region is set for the KMS at {endpoint}: set one, for example eu-west-1"
            )));
        }
        let header_safe = http::HeaderValue::from_str(&credentials.access_key_id).is_ok()
            && credentials.session_token.as_deref().is_none_or(|t| http::HeaderValue::from_str(t).is_ok());
        if credentials.access_key_id.is_empty() || !header_safe {
            return Err(AwsError::Refused(format!(
                "the credentials for the KMS at {endpoint} have an empty access key id, or an access \
                 key id or session token with characters that cannot be sent: check them"
            )));
        }
        let uri = http::Uri::builder()
            .scheme(if https { "https" } else { "http" })
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| invalid(&e.to_string()))?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = if https {
            tls.with_provider_and_native_roots(provider).map_err(|e| {
                AwsError::Refused(format!(
                    "cannot use the KMS at {endpoint}: {e}; install CA certificates (for example the \
                     ca-certificates package) in the operator image, or point SSL_CERT_FILE at a bundle"
                ))
            })?
        } else {
            // Plain http never does TLS: no roots to load (and none needed on the system).
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(&format!("cannot set up TLS ({e})")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            tls.with_tls_config(config)
        };
        let connector = tls.https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(AwsKms {
            inner: Arc::new(Inner {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                uri,
                host: authority.as_str().to_string(),
                region: region.to_string(),
                credentials,
                client,
            }),
        })
    }

    /// GenerateDataKey {KeyId, KeySpec: "AES_256"}: a new data key, in plaintext and wrapped by
    /// `key_id` (a key id, key ARN, `alias/NAME` or alias ARN) as the KMS's CiphertextBlob.
    pub async fn generate_data_key(&self, key_id: &str) -> Result<([u8; 32], Vec<u8>), AwsError> {
        let call = self.describe("GenerateDataKey", key_id);
        let answer = self.call(&call, json!({"KeyId": key_id, "KeySpec": "AES_256"})).await?;
        let key = data_key(&call, &answer)?;
        let blob = blob_field(&call, &answer, "CiphertextBlob")?;
        Ok((key, blob))
    }

    /// Decrypt {CiphertextBlob, KeyId}: the data key `blob` wraps, unwrapped by `key_id` (the KMS
    /// refuses a blob another key made). A plaintext that is not 32 bytes is Refused.
    pub async fn decrypt(&self, key_id: &str, blob: &[u8]) -> Result<[u8; 32], AwsError> {
        let call = self.describe("Decrypt", key_id);
        let answer = self.call(&call, json!({"CiphertextBlob": BASE64.encode(blob), "KeyId": key_id})).await?;
        data_key(&call, &answer)
    }

    fn describe<'a>(&'a self, op: &'a str, key_id: &'a str) -> Call<'a> {
        Call { endpoint: &self.inner.endpoint, region: &self.inner.region, op, key_id }
    }

    /// One signed `TrentService.<op>` call: the answer's JSON, or why there is none.
    async fn call(&self, call: &Call<'_>, request: Value) -> Result<Value, AwsError> {
        let target = format!("TrentService.{}", call.op);
        let headers = [("content-type", JSON_1_1), ("x-amz-target", target.as_str())];
        let (status, body) = self.send("kms", &headers, request.to_string().into_bytes()).await.map_err(|why| {
            AwsError::Transient(format!(
                "no answer from the KMS at {} to {} with key {:?}: {why}; retrying may help",
                call.endpoint, call.op, call.key_id
            ))
        })?;
        outcome(call, status, &body)
    }

    /// One signed `POST /` for `service` with `headers` (besides host, x-amz-date, the session
    /// token and authorization) and `body`: the answer's status and body, or why there is none.
    async fn send(&self, service: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<(u16, Bytes), String> {
        let inner = &*self.inner;
        let unsigned = Unsigned { method: "POST", host: &inner.host, path: "/", headers, body: &body };
        let signed = sign(&inner.credentials, &inner.region, service, &unsigned, jiff::Timestamp::now());
        let mut request = http::Request::post(inner.uri.clone())
            .header(http::header::HOST, &inner.host)
            .header("x-amz-date", &signed.amz_date)
            .header(http::header::AUTHORIZATION, &signed.authorization);
        if let Some(token) = &inner.credentials.session_token {
            request = request.header("x-amz-security-token", token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request =
            request.body(Full::new(Bytes::from(body))).map_err(|e| format!("cannot build the request: {e}"))?;
        let exchange = async {
            let response = inner.client.request(request).await.map_err(|e| error_chain(&e))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the answer (HTTP {status}): {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
    }
}

/// An error and its sources, deduplicated (hyper's say "client error (Connect)" on top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// One KMS call, for messages: where, which operation, with which key.
struct Call<'a> {
    endpoint: &'a str,
    region: &'a str,
    op: &'a str,
    key_id: &'a str,
}

/// Error types that say "later": throttling, quotas of requests, the KMS's own trouble.
const TRANSIENT_TYPES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "TooManyRequestsException",
    "LimitExceededException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
];

/// What the KMS's answer to `call` means: its JSON, or the error.
fn outcome(call: &Call<'_>, status: u16, body: &[u8]) -> Result<Value, AwsError> {
    let Call { endpoint, region, op, key_id } = *call;
    if (200..300).contains(&status) {
        return serde_json::from_slice(body).map_err(|e| {
            AwsError::Transient(format!(
                "the KMS at {endpoint} answered {op} with key {key_id:?} with HTTP {status} and a body that is \
                 not JSON ({e}); retrying may help"
            ))
        });
    }
    let (kind, message) = error_of(body);
    let said = match (kind.is_empty(), message.is_empty()) {
        (false, false) => format!("{kind}: {message}"),
        (false, true) => kind.clone(),
        (true, false) => message,
        (true, true) => "no error message".into(),
    };
    if status >= 500 || status == 408 || status == 429 || TRANSIENT_TYPES.contains(&kind.as_str()) {
        return Err(AwsError::Transient(format!(
            "the KMS at {endpoint} failed {op} with key {key_id:?}: {said} (HTTP {status}); retrying may help"
        )));
    }
    let advice = match kind.as_str() {
        "NotFoundException" => format!(
            "check that the key exists in region {region} of this KMS and that the key id names it \
             (a key id, key ARN, alias/NAME or alias ARN)"
        ),
        "DisabledException" => "the key is disabled: enable it (EnableKey) to use it again".into(),
        "KMSInvalidStateException" => "the key cannot be used in its state (for example pending deletion): \
                                       cancel its deletion or enable it"
            .into(),
        "AccessDeniedException" | "AccessDenied" => format!(
            "allow these credentials kms:{op} on the key (in the key policy, a grant or an IAM policy){}",
            if op == "Decrypt" { ", and check that the key is the one that wrapped the data key" } else { "" }
        ),
        "InvalidCiphertextException" | "IncorrectKeyException" => {
            "the wrapped data key is damaged or was not made by this key: what it protects cannot be \
             decrypted with this key"
                .into()
        }
        "InvalidKeyUsageException" => "use a symmetric ENCRYPT_DECRYPT key".into(),
        "UnrecognizedClientException" | "InvalidClientTokenId" => {
            "this KMS does not know the access key id: check the credentials".into()
        }
        "InvalidSignatureException" | "SignatureDoesNotMatch" => {
            format!("check the secret access key, the signing region ({region}) and the operator's clock")
        }
        "ExpiredTokenException" | "ExpiredToken" => "the session token has expired: renew the credentials".into(),
        _ => "check the key id, the key's state and the credentials".into(),
    };
    Err(AwsError::Refused(format!(
        "the KMS at {endpoint} refused {op} with key {key_id:?}: {said} (HTTP {status}); {advice}"
    )))
}

/// The error type (without a `namespace#` prefix) and message of an error answer: JSON
/// `{"__type", "message"|"Message"}`, or XML `<Code>`/`<Message>`, or else the start of the body.
fn error_of(body: &[u8]) -> (String, String) {
    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) {
        let text = |names: &[&str]| {
            names.iter().find_map(|n| fields.get(*n).and_then(Value::as_str)).unwrap_or_default().to_string()
        };
        let kind = text(&["__type", "code", "Code"]);
        // `com.amazonaws.kms#NotFoundException`, or `NotFoundException:http://internal...`.
        let kind = kind.rsplit('#').next().unwrap_or_default().split(':').next().unwrap_or_default().to_string();
        return (kind, text(&["message", "Message", "errorMessage"]));
    }
    let text = String::from_utf8_lossy(body);
    if let Some(code) = between(&text, "<Code>", "</Code>") {
        return (code.to_string(), between(&text, "<Message>", "</Message>").unwrap_or_default().to_string());
    }
    (String::new(), text.trim().chars().take(200).collect())
}

/// The text between the first `open` and the `close` after it.
fn between<'t>(text: &'t str, open: &str, close: &str) -> Option<&'t str> {
    let (_, rest) = text.split_once(open)?;
    rest.split_once(close).map(|(inside, _)| inside.trim())
}

/// The answer's `Plaintext`: a 32-byte data key.
fn data_key(call: &Call<'_>, answer: &Value) -> Result<[u8; 32], AwsError> {
    let plaintext = blob_field(call, answer, "Plaintext")?;
    <[u8; 32]>::try_from(plaintext.as_slice()).map_err(|_| {
        AwsError::Refused(format!(
            "the KMS at {} answered {} with key {:?} with a plaintext of {} bytes, not a 32-byte (AES_256) data \
             key{}",
            call.endpoint,
            call.op,
            call.key_id,
            plaintext.len(),
            if call.op == "Decrypt" { ": the ciphertext is not a data key this operator made" } else { "" }
        ))
    })
}

/// A non-empty base64 field of the answer.
fn blob_field(call: &Call<'_>, answer: &Value, field: &str) -> Result<Vec<u8>, AwsError> {
    answer.get(field).and_then(Value::as_str).and_then(|b| BASE64.decode(b).ok()).filter(|b| !b.is_empty()).ok_or_else(
        || {
            AwsError::Transient(format!(
                "the KMS at {} answered {} with key {:?} without a base64 {field}: an unreadable answer; retrying \
                 may help",
                call.endpoint, call.op, call.key_id
            ))
        },
    )
}

/// A request to sign. The signer adds `host`, `x-amz-date` and, with a session token,
/// `x-amz-security-token` to `headers`; the sender must send exactly those and `headers`.
struct Unsigned<'a> {
    method: &'a str,
    /// The `Host` header: host, and port when not the scheme's default.
    host: &'a str,
    /// The absolute path, already URI-encoded (`/` for the KMS); no query.
    path: &'a str,
    /// Further headers to sign (names in any case, unique).
    headers: &'a [(&'a str, &'a str)],
    body: &'a [u8],
}

/// What signing adds to a request.
#[derive(Debug, PartialEq)]
struct Signed {
    /// `X-Amz-Date`: `YYYYMMDDTHHMMSSZ`.
    amz_date: String,
    /// `Authorization`.
    authorization: String,
}

/// AWS Signature Version 4 of `request` for `service` in `region` at `time` (header-based).
fn sign(
    credentials: &Credentials,
    region: &str,
    service: &str,
    request: &Unsigned<'_>,
    time: jiff::Timestamp,
) -> Signed {
    let amz_date = time.strftime("%Y%m%dT%H%M%SZ").to_string();
    let date = amz_date.get(..8).unwrap_or(&amz_date); // YYYYMMDD
    let mut headers: Vec<(String, String)> =
        vec![("host".into(), canonical_value(request.host)), ("x-amz-date".into(), amz_date.clone())];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token".into(), canonical_value(token)));
    }
    headers.extend(request.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), canonical_value(v))));
    headers.sort();
    let signed_headers = headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(";");
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let canonical_request = format!(
        "{}\n{}\n\n{canonical_headers}\n{signed_headers}\n{}",
        request.method,
        request.path,
        hex(&Sha256::digest(request.body))
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
    let key = signing_key(&credentials.secret_access_key, date, region, service);
    let signature = hex(hmac::sign(&key, string_to_sign.as_bytes()).as_ref());
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        credentials.access_key_id
    );
    Signed { amz_date, authorization }
}

/// The SigV4 signing key: `aws4_request` keyed by the service, keyed by the region, keyed by the
/// date, keyed by `AWS4` + the secret.
fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> hmac::Key {
    let mut key = hmac::Key::new(hmac::HMAC_SHA256, format!("AWS4{secret}").as_bytes());
    for part in [date, region, service, "aws4_request"] {
        key = hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&key, part.as_bytes()).as_ref());
    }
    key
}

/// A header value as SigV4 signs it: trimmed, runs of spaces made one.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, b| {
        let _ = write!(text, "{b:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        process::{Child, Command, Stdio},
        time::Instant,
    };

    use super::*;

    const ACCESS_KEY: &str = "AKIDEXAMPLE";
    const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    /// The session token of the suite's `post-sts-header-*` vectors.
    const STS_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    fn credentials(session_token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            session_token: session_token.map(Into::into),
        }
    }

    fn at(time: &str) -> jiff::Timestamp {
        time.parse().expect("timestamp")
    }

    /// The AWS Signature Version 4 test suite (docs.aws.amazon.com/general/latest/gr/
    /// signature-v4-test-suite.html, also aws-c-auth's tests/aws-signing-test-suite/v4): the
    /// `get-vanilla`, `post-vanilla`, `post-x-www-form-urlencoded` and `post-sts-header-before`
    /// requests, each signed exactly as published.
    #[test]
    fn sigv4_matches_the_aws_test_suite() {
        let scope = "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
        let form = [("Content-Type", "application/x-www-form-urlencoded")];
        let vanilla = |method: &'static str| Unsigned {
            method,
            host: "example.amazonaws.com",
            path: "/",
            headers: &[],
            body: b"",
        };
        let cases = [
            (
                "get-vanilla",
                vanilla("GET"),
                None,
                "SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "post-vanilla",
                vanilla("POST"),
                None,
                "SignedHeaders=host;x-amz-date, \
                 Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
            ),
            (
                "post-x-www-form-urlencoded",
                Unsigned { headers: &form, body: b"Param1=value1", ..vanilla("POST") },
                None,
                "SignedHeaders=content-type;host;x-amz-date, \
                 Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
            ),
            (
                "post-sts-header-before",
                vanilla("POST"),
                Some(STS_TOKEN),
                "SignedHeaders=host;x-amz-date;x-amz-security-token, \
                 Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
            ),
        ];
        for (name, request, token, expected) in cases {
            let signed = sign(&credentials(token), "us-east-1", "service", &request, at("2015-08-30T12:36:00Z"));
            assert_eq!(
                signed,
                Signed {
                    amz_date: "20150830T123600Z".into(),
                    authorization: format!("AWS4-HMAC-SHA256 {scope}, {expected}")
                },
                "{name}"
            );
        }
    }

    /// The signing key of AWS's "Examples of how to derive a signing key for Signature Version 4"
    /// (the secret above, 20120215, us-east-1, iam): tells a broken key derivation from a broken
    /// canonical request.
    #[test]
    fn sigv4_signing_key_matches_the_aws_example() {
        // The key is opaque: compare what it signs with an HMAC keyed by the published bytes.
        let published = "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d";
        let bytes: Vec<u8> = (0..published.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&published[i..i + 2], 16).expect("hex"))
            .collect();
        let expected = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        let key = signing_key(SECRET_KEY, "20120215", "us-east-1", "iam");
        assert_eq!(hmac::sign(&key, b"probe").as_ref(), hmac::sign(&expected, b"probe").as_ref());
    }

    /// A KMS-shaped request (the headers and body `generate_data_key` sends, with a session
    /// token), against the signature botocore 1.44.8's `SigV4Auth` computes for it: AWS publishes
    /// no KMS vector, so an independent implementation is the reference.
    #[test]
    fn sigv4_of_a_kms_request_matches_botocore() {
        let headers = [("Content-Type", JSON_1_1), ("X-Amz-Target", "TrentService.GenerateDataKey")];
        let request = Unsigned {
            method: "POST",
            host: "kms.eu-west-1.amazonaws.com",
            path: "/",
            headers: &headers,
            body: br#"{"KeyId":"alias/ims","KeySpec":"AES_256"}"#,
        };
        let signed =
            sign(&credentials(Some("session-token-example")), "eu-west-1", "kms", &request, at("2015-08-30T12:36:00Z"));
        assert_eq!(
            signed.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/kms/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, \
             Signature=091886050b09d7ad08db620f12eae6647cc8e30f02a8f44e5ffef725fa592ee8"
        );
    }

    /// Each kind of answer, as AWS (and moto) send it, and what it means.
    #[test]
    fn answers_map_to_refused_or_transient() {
        let call = Call {
            endpoint: "https://kms.eu-west-1.amazonaws.com",
            region: "eu-west-1",
            op: "Decrypt",
            key_id: "alias/ims",
        };
        let refused = |status: u16, body: &str, expect: &[&str]| match outcome(&call, status, body.as_bytes()) {
            Err(AwsError::Refused(message)) => {
                for part in expect.iter().chain(&["\"alias/ims\"", "Decrypt"]) {
                    assert!(message.contains(part), "{message:?} should contain {part:?}");
                }
            }
            other => panic!("HTTP {status} {body}: expected Refused, got {other:?}"),
        };
        let transient = |status: u16, body: &str| match outcome(&call, status, body.as_bytes()) {
            Err(AwsError::Transient(message)) => assert!(message.contains("alias/ims"), "{message}"),
            other => panic!("HTTP {status} {body}: expected Transient, got {other:?}"),
        };
        refused(
            400,
            r#"{"__type":"DisabledException","message":"arn:aws:kms:eu-west-1:111122223333:key/1234abcd is disabled."}"#,
            &["DisabledException: arn:aws:kms:eu-west-1:111122223333:key/1234abcd is disabled.", "enable it"],
        );
        refused(
            400,
            r#"{"__type":"com.amazonaws.kms#NotFoundException","Message":"Alias alias/ims is not found."}"#,
            &["NotFoundException: Alias alias/ims is not found.", "eu-west-1"],
        );
        refused(400, r#"{"__type":"KMSInvalidStateException","message":"pending deletion"}"#, &["cancel its deletion"]);
        refused(400, r#"{"__type":"AccessDeniedException","message":"not allowed"}"#, &["kms:Decrypt"]);
        refused(400, r#"{"__type":"InvalidCiphertextException"}"#, &["InvalidCiphertextException", "damaged"]);
        refused(400, r#"{"__type":"IncorrectKeyException","message":"x"}"#, &["IncorrectKeyException"]);
        refused(400, r#"{"__type":"ValidationException","message":"1 validation error"}"#, &["ValidationException"]);
        refused(
            400,
            r#"{"__type":"InvalidSignatureException","message":"Signature expired"}"#,
            &["InvalidSignatureException", "clock"],
        );
        refused(
            403,
            r#"<?xml version="1.0" encoding="utf-8"?>
<ErrorResponse><Errors><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match.</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"#,
            &["SignatureDoesNotMatch: The request signature we calculated does not match.", "secret access key"],
        );
        refused(404, "<html>no such page</html>", &["<html>no such page</html>", "HTTP 404"]);
        transient(400, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#);
        transient(400, r#"{"__type":"LimitExceededException","message":"too many requests"}"#);
        transient(500, r#"{"__type":"KMSInternalException","message":"oops"}"#);
        transient(500, r#"{"__type":"KeyUnavailableException","message":"the custom key store is disconnected"}"#);
        transient(503, "<html>Service Unavailable</html>");
        transient(429, "");
        transient(200, "<html>a captive portal</html>");

        let ok = outcome(&call, 200, br#"{"Plaintext":"AAEC","KeyId":"arn"}"#).expect("a JSON answer");
        assert_eq!(blob_field(&call, &ok, "Plaintext").expect("base64"), [0, 1, 2]);
        match data_key(&call, &ok) {
            Err(AwsError::Refused(message)) => assert!(message.contains("3 bytes"), "{message}"),
            other => panic!("a 3-byte plaintext must be refused: {other:?}"),
        }
        assert!(matches!(
            blob_field(&call, &json!({"Plaintext": "not base64!"}), "Plaintext"),
            Err(AwsError::Transient(_))
        ));
    }

    #[test]
    fn new_refuses_what_is_not_an_http_url() {
        for endpoint in [
            "",
            "kms.eu-west-1.amazonaws.com",
            "ftp://kms.example",
            "http://",
            "https://kms.example/v1",
            "http://kms.example/?a=b",
            "http://user:pass@kms.example",
        ] {
            match AwsKms::new(endpoint, "eu-west-1", credentials(None)) {
                Err(AwsError::Refused(message)) => assert!(message.contains("http(s)://"), "{endpoint}: {message}"),
                other => panic!("{endpoint:?} must be refused: {other:?}"),
            }
        }
        assert!(matches!(AwsKms::new("http://127.0.0.1:5000", "", credentials(None)), Err(AwsError::Refused(_))));
        for endpoint in [
            "http://127.0.0.1:5000",
            "http://127.0.0.1:5000/",
            "https://kms.eu-west-1.amazonaws.com",
            "http://[::1]:4566",
        ] {
            AwsKms::new(endpoint, "eu-west-1", credentials(None)).unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        }
    }

    #[test]
    fn debug_prints_no_secret() {
        let kms = AwsKms::new("http://127.0.0.1:5000", "eu-west-1", credentials(Some(STS_TOKEN))).expect("client");
        let printed = format!("{kms:?}");
        assert!(printed.contains(ACCESS_KEY) && printed.contains("127.0.0.1:5000"), "{printed}");
        assert!(!printed.contains(SECRET_KEY) && !printed.contains(STS_TOKEN), "{printed}");
    }

    #[tokio::test]
    async fn nothing_listening_is_transient() {
        let endpoint = format!("http://{}", free_addr());
        let kms = AwsKms::new(&endpoint, "eu-west-1", credentials(None)).expect("client");
        for result in
            [kms.generate_data_key("alias/ims").await.map(|_| ()), kms.decrypt("alias/ims", b"blob").await.map(|_| ())]
        {
            match result {
                Err(AwsError::Transient(message)) => {
                    assert!(message.contains(&endpoint) && message.contains("alias/ims"), "{message}")
                }
                other => panic!("expected Transient, got {other:?}"),
            }
        }
    }

    /// A port on 127.0.0.1 that nothing listens on (it was free a moment ago).
    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
    }

    const REGION: &str = "eu-west-1";
    /// moto's IAM checks signatures and policies after this many unauthenticated actions: the
    /// three that create the test user, its access key and its policy.
    const UNAUTHENTICATED_ACTIONS: &str = "3";
    const USER: &str = "ims-operator";

    /// A `moto_server` child on 127.0.0.1 that checks signatures, killed on drop.
    struct Moto {
        child: Child,
        endpoint: String,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Moto {
        /// Starts moto, or says why not and returns None (fails instead when `IMS_REQUIRE_S3` is
        /// set, as tests/s3.rs does).
        async fn start() -> Option<Moto> {
            let installed = Command::new("moto_server")
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !installed {
                assert!(
                    std::env::var_os("IMS_REQUIRE_S3").is_none(),
                    "moto_server is required (IMS_REQUIRE_S3 is set) but was not found on PATH: pip install 'moto[server]'"
                );
                eprintln!("moto_server is not installed (pip install 'moto[server]'): skipping this KMS scenario");
                return None;
            }
            // A free port can be taken between the check and moto's bind: try a few.
            let mut last = String::new();
            for _ in 0..3 {
                let addr = free_addr();
                let child = Command::new("moto_server")
                    .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
                    .env("INITIAL_NO_AUTH_ACTION_COUNT", UNAUTHENTICATED_ACTIONS)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn moto_server");
                let mut moto = Moto { child, endpoint: format!("http://{addr}") };
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    if let Ok(Some(status)) = moto.child.try_wait() {
                        last = format!("moto_server on {addr} exited with {status}");
                        break;
                    }
                    // Only a connection: an HTTP request would use up an unauthenticated action.
                    if tokio::net::TcpStream::connect(addr).await.is_ok() {
                        return Some(moto);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if last.is_empty() {
                    last = format!("moto_server on {addr} did not listen within 60s");
                }
            }
            panic!("could not start moto_server: {last}");
        }

        /// Creates the IAM user the scenario signs as, allowed everything: its credentials.
        async fn user(&self) -> Credentials {
            let anyone = AwsKms::new(&self.endpoint, REGION, credentials(None)).expect("client");
            iam(&anyone, &[("Action", "CreateUser"), ("UserName", USER)]).await;
            let key = iam(&anyone, &[("Action", "CreateAccessKey"), ("UserName", USER)]).await;
            let field = |name: &str| {
                between(&key, &format!("<{name}>"), &format!("</{name}>"))
                    .unwrap_or_else(|| panic!("no {name} in {key}"))
                    .to_string()
            };
            let user = Credentials {
                access_key_id: field("AccessKeyId"),
                secret_access_key: field("SecretAccessKey"),
                session_token: None,
            };
            allow(&anyone, true).await;
            user
        }
    }

    /// Sets the user's policy: everything in IAM and KMS, except GenerateDataKey and Decrypt when
    /// `kms` is false.
    async fn allow(client: &AwsKms, kms: bool) {
        let mut statements = vec![json!({"Effect": "Allow", "Action": ["iam:*", "kms:*"], "Resource": "*"})];
        if !kms {
            statements
                .push(json!({"Effect": "Deny", "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": "*"}));
        }
        let policy = json!({"Version": "2012-10-17", "Statement": statements}).to_string();
        let form =
            [("Action", "PutUserPolicy"), ("UserName", USER), ("PolicyName", "ims"), ("PolicyDocument", &policy)];
        iam(client, &form).await;
    }

    /// One IAM (query protocol) call through the client's signed `send`: the XML answer.
    async fn iam(client: &AwsKms, form: &[(&str, &str)]) -> String {
        // Every byte but the unreserved ones escaped: moto re-encodes the form it parsed that
        // way (as botocore does) before checking the signature.
        let escape = |text: &str| {
            text.bytes().fold(String::new(), |mut out, b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    out.push(char::from(b));
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
                out
            })
        };
        let body = form
            .iter()
            .chain(&[("Version", "2010-05-08")])
            .map(|(name, value)| format!("{}={}", escape(name), escape(value)))
            .collect::<Vec<_>>()
            .join("&");
        let headers = [("content-type", "application/x-www-form-urlencoded; charset=utf-8")];
        let (status, answer) = client.send("iam", &headers, body.into_bytes()).await.expect("IAM answers");
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(status, 200, "IAM {form:?}: {answer}");
        answer
    }

    /// A KMS operation the client does not offer (CreateKey, DisableKey...) through its signed call.
    async fn admin(kms: &AwsKms, op: &str, request: Value) -> Value {
        let call = kms.describe(op, "-");
        kms.call(&call, request).await.unwrap_or_else(|e| panic!("{op}: {e}"))
    }

    #[track_caller]
    fn assert_refused<T: fmt::Debug>(result: Result<T, AwsError>, expect: &[&str]) {
        match result {
            Err(AwsError::Refused(message)) => {
                for part in expect {
                    assert!(message.contains(part), "{message:?} should contain {part:?}");
                }
            }
            other => panic!("expected Refused containing {expect:?}, got {other:?}"),
        }
    }

    /// The client against moto's KMS, with moto checking every signature against its IAM user.
    #[tokio::test]
    async fn kms_against_moto() {
        let Some(moto) = Moto::start().await else { return };
        let user = moto.user().await;
        let kms = AwsKms::new(&moto.endpoint, REGION, user.clone()).expect("client");
        let create = json!({"KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT"});
        let key = admin(&kms, "CreateKey", create.clone()).await["KeyMetadata"]["KeyId"]
            .as_str()
            .expect("a key id")
            .to_string();
        let other = admin(&kms, "CreateKey", create).await["KeyMetadata"]["Arn"].as_str().expect("an ARN").to_string();

        // A data key, wrapped, unwrapped to the same bytes; each call makes a new one.
        let (data_key, blob) = kms.generate_data_key(&key).await.expect("GenerateDataKey");
        assert!(!blob.is_empty() && data_key != [0; 32]);
        assert_eq!(kms.decrypt(&key, &blob).await.expect("Decrypt"), data_key);
        let (second, second_blob) = kms.generate_data_key(&key).await.expect("GenerateDataKey");
        assert!(second != data_key && second_blob != blob);

        // A damaged blob, or one another key made.
        let mut tampered = blob.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert_refused(kms.decrypt(&key, &tampered).await, &["InvalidCiphertextException", &key]);
        assert_refused(kms.decrypt(&other, &blob).await, &["AccessDeniedException", &other]);

        // A key that does not exist.
        let missing = "0a1b2c3d-0000-4000-8000-00000000abcd";
        assert_refused(kms.generate_data_key(missing).await, &["NotFoundException", missing]);
        assert_refused(kms.decrypt(missing, &blob).await, &["NotFoundException", missing]);

        // An alias deleted, then made again: refused while it is gone, usable again after.
        let alias = "alias/ims-test";
        admin(&kms, "CreateAlias", json!({"AliasName": alias, "TargetKeyId": key})).await;
        let (by_alias, alias_blob) = kms.generate_data_key(alias).await.expect("GenerateDataKey by alias");
        assert_eq!(kms.decrypt(&key, &alias_blob).await.expect("Decrypt"), by_alias);
        admin(&kms, "DeleteAlias", json!({"AliasName": alias})).await;
        assert_refused(kms.decrypt(alias, &blob).await, &["NotFoundException", alias]);
        admin(&kms, "CreateAlias", json!({"AliasName": alias, "TargetKeyId": key})).await;
        assert_eq!(kms.decrypt(alias, &blob).await.expect("Decrypt by alias"), data_key);

        // Access revoked (an IAM Deny), then restored.
        allow(&kms, false).await;
        assert_refused(kms.generate_data_key(&key).await, &["AccessDenied", "kms:GenerateDataKey", &key]);
        assert_refused(kms.decrypt(&key, &blob).await, &["AccessDenied", "kms:Decrypt", &key]);
        allow(&kms, true).await;
        assert_eq!(kms.decrypt(&key, &blob).await.expect("Decrypt after the grant"), data_key);

        // A disabled key. AWS answers DisabledException (its mapping is in
        // answers_map_to_refused_or_transient); moto 5.2 records the state but still serves the
        // key, so the refusal is checked only where the server enforces it.
        admin(&kms, "DisableKey", json!({"KeyId": key})).await;
        let state = admin(&kms, "DescribeKey", json!({"KeyId": key})).await;
        assert_eq!(state["KeyMetadata"]["KeyState"], "Disabled", "{state}");
        match kms.generate_data_key(&key).await {
            Ok(_) => eprintln!("this moto does not enforce DisableKey: a disabled key still serves"),
            Err(e) => {
                assert_refused(Err::<(), _>(e), &["DisabledException", &key]);
                assert_refused(kms.decrypt(&key, &blob).await, &["DisabledException", &key]);
            }
        }
        admin(&kms, "EnableKey", json!({"KeyId": key})).await;
        assert_eq!(kms.decrypt(&key, &blob).await.expect("Decrypt after EnableKey"), data_key);

        // moto checks signatures: a wrong secret, or an access key it does not know.
        let wrong_secret = Credentials { secret_access_key: "not-the-secret".into(), ..user.clone() };
        let impostor = AwsKms::new(&moto.endpoint, REGION, wrong_secret).expect("client");
        assert_refused(impostor.decrypt(&key, &blob).await, &["SignatureDoesNotMatch", &key]);
        let stranger = AwsKms::new(&moto.endpoint, REGION, credentials(None)).expect("client");
        assert_refused(stranger.generate_data_key(&key).await, &["InvalidClientTokenId", &key]);
    }
}
