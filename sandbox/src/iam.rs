//! A small emulation of IAM roles (the query protocol), enough for a
//! pipeline to check or create the role it passes to IoT.
//!
//! Requests are `POST /` with a form-encoded body `Action=..&Version=2010-05-08&..`
//! (parameters in the query string are read too) and get XML answers in the
//! shape IAM gives them. Supported actions: `CreateRole`, `GetRole`,
//! `DeleteRole`, `ListRoles`. Errors are IAM's
//! `<ErrorResponse><Error><Type>Sender</Type><Code>..</Code><Message>..`
//! with the status IAM uses: `NoSuchEntity` 404, `EntityAlreadyExists` 409,
//! `MalformedPolicyDocument`, `ValidationError` and `InvalidAction` 400.
//!
//! Real IAM returns `AssumeRolePolicyDocument` URL-encoded; so does this.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use s3s::Body;
use serde::{Deserialize, Serialize};

use crate::state::{self, State};
use crate::{ids, Shared, ACCOUNT_ID};

/// The XML namespace of every IAM answer.
const XMLNS: &str = "https://iam.amazonaws.com/doc/2010-05-08/";
/// The only API version IAM has.
const VERSION: &str = "2010-05-08";
/// Largest request body read.
const MAX_BODY: usize = 256 * 1024;
/// Longest trust policy IAM accepts by default.
const MAX_POLICY: usize = 2048;

/// A role as the sandbox keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Role {
    pub role_name: String,
    pub role_id: String,
    pub path: String,
    pub arn: String,
    /// The trust policy as the caller sent it (not URL-encoded).
    pub assume_role_policy_document: String,
    pub description: Option<String>,
    pub max_session_duration: u32,
    /// Seconds since the epoch.
    pub create_date: f64,
}

/// An IAM error: its code, HTTP status and message.
#[derive(Debug, PartialEq)]
pub(crate) struct IamError {
    code: &'static str,
    status: StatusCode,
    message: String,
}

impl IamError {
    fn new(code: &'static str, status: StatusCode, message: impl Into<String>) -> IamError {
        IamError {
            code,
            status,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> IamError {
        IamError::new("ValidationError", StatusCode::BAD_REQUEST, message)
    }

    fn no_such_role(name: &str) -> IamError {
        IamError::new(
            "NoSuchEntity",
            StatusCode::NOT_FOUND,
            format!("The role with name {name} cannot be found."),
        )
    }

    fn into_response(self, request_id: &str) -> Response<Body> {
        let kind = if self.status.is_server_error() {
            "Receiver"
        } else {
            "Sender"
        };
        let body = format!(
            "<ErrorResponse xmlns=\"{XMLNS}\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
            self.code,
            escape(&self.message)
        );
        xml_response(self.status, body)
    }
}

/// Escapes text for an XML element.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but the RFC 3986 unreserved characters, as
/// IAM does with policy documents.
fn url_encode(text: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SET).to_string()
}

/// ISO 8601 in UTC with whole seconds, as IAM writes dates.
fn iso8601(epoch_seconds: f64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(epoch_seconds as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn xml_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    response
}

/// A successful answer: `<{Action}Response><{Action}Result>{result}..`.
fn success(action: &str, result: Option<&str>, request_id: &str) -> Response<Body> {
    let result = match result {
        Some(inner) => format!("  <{action}Result>\n{inner}  </{action}Result>\n"),
        None => String::new(),
    };
    let body = format!(
        "<{action}Response xmlns=\"{XMLNS}\">\n{result}  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n</{action}Response>\n"
    );
    xml_response(StatusCode::OK, body)
}

/// The `<Role>` (or `<member>`) element of a role.
fn role_xml(tag: &str, role: &Role, indent: &str) -> String {
    let mut out = format!("{indent}<{tag}>\n");
    let mut field = |name: &str, value: &str| out.push_str(&format!("{indent}  <{name}>{}</{name}>\n", escape(value)));
    field("Path", &role.path);
    field("RoleName", &role.role_name);
    field("RoleId", &role.role_id);
    field("Arn", &role.arn);
    field("CreateDate", &iso8601(role.create_date));
    field(
        "AssumeRolePolicyDocument",
        &url_encode(&role.assume_role_policy_document),
    );
    if let Some(description) = &role.description {
        field("Description", description);
    }
    field("MaxSessionDuration", &role.max_session_duration.to_string());
    out.push_str(&format!("{indent}</{tag}>\n"));
    out
}

/// The parameters of a request: the query string and a form body.
struct Params(BTreeMap<String, String>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A required parameter, with IAM's validation message when missing.
    fn required(&self, name: &str) -> Result<&str, IamError> {
        self.get(name).ok_or_else(|| {
            let member = lower_first(name);
            IamError::validation(format!(
                "1 validation error detected: Value null at '{member}' failed to satisfy constraint: Member must not be null"
            ))
        })
    }
}

fn lower_first(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) => c.to_ascii_lowercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// Role names: `[\w+=,.@-]{1,64}`.
fn validate_role_name(name: &str) -> Result<(), IamError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(IamError::validation(format!(
            "1 validation error detected: Value '{name}' at 'roleName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]+"
        )))
    }
}

/// Paths: `/` or `/a/b/`, at most 512 characters.
fn validate_path(path: &str) -> Result<(), IamError> {
    let ok = path.len() <= 512
        && path.starts_with('/')
        && path.ends_with('/')
        && path.chars().all(|c| ('\u{21}'..='\u{7e}').contains(&c));
    if ok {
        Ok(())
    } else {
        Err(IamError::validation(format!(
            "The specified value for path is invalid. It must begin and end with / and contain only alphanumeric characters and/or / characters: {path}"
        )))
    }
}

/// A trust policy must be a JSON object of at most [`MAX_POLICY`] characters.
fn validate_trust_policy(document: &str) -> Result<(), IamError> {
    if document.len() > MAX_POLICY {
        return Err(IamError::new(
            "LimitExceeded",
            StatusCode::CONFLICT,
            format!("Cannot exceed quota for ACLSizePerRole: {MAX_POLICY}"),
        ));
    }
    match serde_json::from_str::<serde_json::Value>(document) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(IamError::new(
            "MalformedPolicyDocument",
            StatusCode::BAD_REQUEST,
            "This policy contains invalid Json",
        )),
    }
}

/// An `AROA..` role id of 21 characters.
fn role_id(seed: u64, n: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bytes = ids::derive(seed, "iam-role-id", n);
    let tail: String = bytes[..17]
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("AROA{tail}")
}

/// CreateRole.
fn create_role(state: &mut State, seed: u64, params: &Params) -> Result<Role, IamError> {
    let name = params.required("RoleName")?;
    validate_role_name(name)?;
    let document = params.required("AssumeRolePolicyDocument")?;
    let path = params.get("Path").unwrap_or("/");
    validate_path(path)?;
    let description = params.get("Description").map(str::to_owned);
    if description.as_ref().is_some_and(|d| d.chars().count() > 1000) {
        return Err(IamError::validation(
            "1 validation error detected: Value at 'description' failed to satisfy constraint: Member must have length less than or equal to 1000",
        ));
    }
    let max_session_duration = match params.get("MaxSessionDuration") {
        None => 3600,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (3600..=43200).contains(&n) => n,
            _ => {
                return Err(IamError::validation(format!(
                    "The requested MaxSessionDuration {v} exceeds the allowed range of 3600 to 43200 seconds"
                )))
            }
        },
    };
    validate_trust_policy(document)?;
    // Role names are unique regardless of case.
    if state.roles.keys().any(|existing| existing.eq_ignore_ascii_case(name)) {
        return Err(IamError::new(
            "EntityAlreadyExists",
            StatusCode::CONFLICT,
            format!("Role with name {name} already exists."),
        ));
    }
    let role = Role {
        role_name: name.to_owned(),
        role_id: role_id(seed, state.take_id()),
        path: path.to_owned(),
        arn: format!("arn:aws:iam::{ACCOUNT_ID}:role{path}{name}"),
        assume_role_policy_document: document.to_owned(),
        description,
        max_session_duration,
        create_date: state::now().floor(),
    };
    state.roles.insert(name.to_owned(), role.clone());
    Ok(role)
}

/// The role of that name (case-insensitive, as IAM looks roles up).
fn find_role<'s>(state: &'s State, name: &str) -> Option<&'s Role> {
    state
        .roles
        .get(name)
        .or_else(|| state.roles.values().find(|r| r.role_name.eq_ignore_ascii_case(name)))
}

/// ListRoles: `PathPrefix`, `Marker` (the name to start from) and `MaxItems`.
fn list_roles(state: &State, params: &Params) -> Result<(Vec<Role>, Option<String>), IamError> {
    let prefix = params.get("PathPrefix").unwrap_or("/");
    let max = match params.get("MaxItems") {
        None => 100,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(IamError::validation(format!(
                    "1 validation error detected: Value '{v}' at 'maxItems' failed to satisfy constraint: Member must have value between 1 and 1000"
                )))
            }
        },
    };
    let marker = params.get("Marker");
    let mut matching = state
        .roles
        .values()
        .filter(|r| r.path.starts_with(prefix))
        .filter(|r| marker.is_none_or(|m| r.role_name.as_str() >= m));
    let page: Vec<Role> = matching.by_ref().take(max).cloned().collect();
    let next = matching.next().map(|r| r.role_name.clone());
    Ok((page, next))
}

/// Reads the parameters of a request from its query string and form body.
async fn read_params(req: Request<Incoming>) -> Result<Params, IamError> {
    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| IamError::validation(format!("cannot read the request body: {e}")))?
        .to_bytes();
    let mut params = BTreeMap::new();
    if let Some(query) = parts.uri.query() {
        params.extend(url::form_urlencoded::parse(query.as_bytes()).into_owned());
    }
    params.extend(url::form_urlencoded::parse(&body).into_owned());
    Ok(Params(params))
}

/// Handles one IAM request.
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    static REQUESTS: AtomicU64 = AtomicU64::new(0);
    let request_id = ids::uuid(
        shared.config.seed,
        "iam-request",
        REQUESTS.fetch_add(1, Ordering::Relaxed),
    );
    let params = match read_params(req).await {
        Ok(params) => params,
        Err(e) => return e.into_response(&request_id),
    };
    let action = params.get("Action").unwrap_or_default().to_owned();
    *state::lock(&shared.iam_calls).entry(action.clone()).or_default() += 1;
    let response = match respond(shared, &action, &params).await {
        Ok(result) => success(&action, result.as_deref(), &request_id),
        Err(e) => {
            tracing::debug!(action, code = e.code, message = %e.message, "IAM request refused");
            e.into_response(&request_id)
        }
    };
    tracing::debug!(action, status = response.status().as_u16(), "IAM request");
    response
}

/// Carries out an action; the inner XML of its `..Result` element, if any.
async fn respond(shared: &Shared, action: &str, params: &Params) -> Result<Option<String>, IamError> {
    if let Some(version) = params.get("Version") {
        if version != VERSION {
            return Err(IamError::new(
                "InvalidAction",
                StatusCode::BAD_REQUEST,
                format!("Could not find operation {action} for version {version}"),
            ));
        }
    }
    let seed = shared.config.seed;
    match action {
        "CreateRole" => {
            let role = shared.store.write(|state| create_role(state, seed, params))?;
            persist(shared).await?;
            Ok(Some(role_xml("Role", &role, "    ")))
        }
        "GetRole" => {
            let name = params.required("RoleName")?;
            validate_role_name(name)?;
            let role = shared
                .store
                .read(|state| find_role(state, name).cloned())
                .ok_or_else(|| IamError::no_such_role(name))?;
            Ok(Some(role_xml("Role", &role, "    ")))
        }
        "DeleteRole" => {
            let name = params.required("RoleName")?;
            validate_role_name(name)?;
            shared.store.write(|state| {
                let key = find_role(state, name)
                    .map(|r| r.role_name.clone())
                    .ok_or_else(|| IamError::no_such_role(name))?;
                state.roles.remove(&key);
                Ok::<_, IamError>(())
            })?;
            persist(shared).await?;
            Ok(None)
        }
        "ListRoles" => {
            let (roles, next) = shared.store.read(|state| list_roles(state, params))?;
            let mut inner = format!("    <IsTruncated>{}</IsTruncated>\n", next.is_some());
            if let Some(marker) = next {
                inner.push_str(&format!("    <Marker>{}</Marker>\n", escape(&marker)));
            }
            inner.push_str("    <Roles>\n");
            for role in &roles {
                inner.push_str(&role_xml("member", role, "      "));
            }
            inner.push_str("    </Roles>\n");
            Ok(Some(inner))
        }
        "" => Err(IamError::new(
            "MissingAction",
            StatusCode::BAD_REQUEST,
            "Missing Action",
        )),
        other => Err(IamError::new(
            "InvalidAction",
            StatusCode::BAD_REQUEST,
            format!("Could not find operation {other} for version {VERSION}"),
        )),
    }
}

async fn persist(shared: &Shared) -> Result<(), IamError> {
    shared.store.persist().await.map_err(|e| {
        IamError::new(
            "ServiceFailure",
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the sandbox could not persist its state: {e:#}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"iot.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

    #[test]
    fn creates_roles_with_iam_arns_and_ids() {
        let mut state = State::default();
        let role = create_role(
            &mut state,
            1,
            &params(&[
                ("RoleName", "prov"),
                ("AssumeRolePolicyDocument", TRUST),
                ("Path", "/service-role/"),
            ]),
        )
        .unwrap();
        assert_eq!(role.arn, "arn:aws:iam::123456789012:role/service-role/prov");
        assert_eq!(role.role_id.len(), 21);
        assert!(role.role_id.starts_with("AROA"));
        let plain = create_role(
            &mut state,
            1,
            &params(&[("RoleName", "b"), ("AssumeRolePolicyDocument", TRUST)]),
        )
        .unwrap();
        assert_eq!(plain.arn, "arn:aws:iam::123456789012:role/b");
        assert_ne!(plain.role_id, role.role_id);

        let again = create_role(
            &mut state,
            1,
            &params(&[("RoleName", "PROV"), ("AssumeRolePolicyDocument", TRUST)]),
        );
        assert_eq!(again.unwrap_err().code, "EntityAlreadyExists");
        let bad = create_role(
            &mut state,
            1,
            &params(&[("RoleName", "c"), ("AssumeRolePolicyDocument", "{nope")]),
        );
        assert_eq!(bad.unwrap_err().status, StatusCode::BAD_REQUEST);
        let missing = create_role(&mut state, 1, &params(&[("RoleName", "c")])).unwrap_err();
        assert_eq!(missing.code, "ValidationError");
        assert!(
            missing.message.contains("'assumeRolePolicyDocument'"),
            "{}",
            missing.message
        );
        assert_eq!(
            create_role(
                &mut state,
                1,
                &params(&[("RoleName", "a/b"), ("AssumeRolePolicyDocument", TRUST)])
            )
            .unwrap_err()
            .code,
            "ValidationError"
        );
        assert_eq!(
            create_role(
                &mut state,
                1,
                &params(&[("RoleName", "d"), ("AssumeRolePolicyDocument", TRUST), ("Path", "x")])
            )
            .unwrap_err()
            .code,
            "ValidationError"
        );
    }

    #[test]
    fn role_xml_encodes_the_trust_policy() {
        let role = Role {
            role_name: "r".into(),
            role_id: "AROAAAAAAAAAAAAAAAAAA".into(),
            path: "/".into(),
            arn: "arn:aws:iam::123456789012:role/r".into(),
            assume_role_policy_document: r#"{"a": "b&c"}"#.into(),
            description: Some("<x>".into()),
            max_session_duration: 3600,
            create_date: 1_700_000_000.0,
        };
        let xml = role_xml("Role", &role, "");
        assert!(
            xml.contains("<AssumeRolePolicyDocument>%7B%22a%22%3A%20%22b%26c%22%7D</AssumeRolePolicyDocument>"),
            "{xml}"
        );
        assert!(xml.contains("<CreateDate>2023-11-14T22:13:20Z</CreateDate>"), "{xml}");
        assert!(xml.contains("<Description>&lt;x&gt;</Description>"), "{xml}");
    }

    #[test]
    fn lists_by_path_prefix_and_marker() {
        let mut state = State::default();
        for (name, path) in [("a", "/"), ("b", "/svc/"), ("c", "/svc/"), ("d", "/")] {
            create_role(
                &mut state,
                1,
                &params(&[("RoleName", name), ("AssumeRolePolicyDocument", TRUST), ("Path", path)]),
            )
            .unwrap();
        }
        let (page, next) = list_roles(&state, &params(&[("MaxItems", "2")])).unwrap();
        assert_eq!(
            page.iter().map(|r| r.role_name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(next.as_deref(), Some("c"));
        let (page, next) = list_roles(&state, &params(&[("MaxItems", "2"), ("Marker", "c")])).unwrap();
        assert_eq!(
            page.iter().map(|r| r.role_name.as_str()).collect::<Vec<_>>(),
            ["c", "d"]
        );
        assert_eq!(next, None);
        let (page, _) = list_roles(&state, &params(&[("PathPrefix", "/svc/")])).unwrap();
        assert_eq!(
            page.iter().map(|r| r.role_name.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert!(list_roles(&state, &params(&[("MaxItems", "0")])).is_err());
    }
}
