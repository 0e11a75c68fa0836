//! The HTTP layer of the IoT emulation: routes, request fields and response
//! shapes, as the botocore model defines each operation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::{
    CaCertificate, Certificate, ProvisioningTemplate, RegistrationConfig, State, Task, TaskStatus, Thing, ThingGroup,
    ThingType,
};
use crate::{s3, Shared, ACCOUNT_ID, REPORTS_BUCKET};

use super::registry::{self, Ctx, NewTemplate, TemplateUpdate, ThingConfig, ThingUpdate};
use super::task::{self, commit, StartRequest};
use super::ApiError;

/// Largest request body the IoT side reads.
const MAX_BODY: usize = 1024 * 1024;

/// A request, read in full.
struct ApiRequest {
    method: Method,
    path: String,
    segments: Vec<String>,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl ApiRequest {
    async fn read(req: Request<Incoming>) -> Result<ApiRequest, ApiError> {
        let (parts, body) = req.into_parts();
        let body = http_body_util::Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?
            .to_bytes();
        let path = parts.uri.path().to_owned();
        let segments = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| ApiError::invalid("the request path is not valid UTF-8"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let query = parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ApiRequest {
            method: parts.method,
            path,
            segments,
            query,
            headers: parts.headers,
            body,
        })
    }

    fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn query_int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.query(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::invalid(format!("{name} must be an integer, not `{v}`")))
            })
            .transpose()
    }

    fn query_bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.query(name) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::invalid(format!("{name} must be true or false, not `{v}`"))),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn principal(&self) -> Result<String, ApiError> {
        self.header("x-amzn-principal")
            .map(str::to_owned)
            .ok_or_else(|| ApiError::invalid("the x-amzn-principal header is required"))
    }

    /// The JSON body as `T`; an empty body reads as `{}`.
    fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}")))
    }
}

fn ctx(shared: &Shared) -> Ctx<'_> {
    Ctx {
        region: &shared.config.region,
        seed: shared.config.seed,
        ca: &shared.ca,
    }
}

/// One page of `items` and the token of the next, for `nextToken`/`marker`
/// style paging (the token is the offset of the next item).
fn page<T>(
    items: Vec<T>,
    token: Option<&str>,
    size: Option<i64>,
    default: usize,
    max: i64,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let size = match size {
        None => default,
        Some(n) if (1..=max).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::invalid(format!("the page size must be 1 to {max}, not {n}"))),
    };
    let start = match token {
        None | Some("") => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::invalid(format!("the pagination token `{t}` is not valid")))?,
    };
    let total = items.len();
    let end = start.saturating_add(size).min(total);
    let page = items.into_iter().skip(start).take(end.saturating_sub(start)).collect();
    let next = (end < total).then(|| end.to_string());
    Ok((page, next))
}

/// The name of the operation a request is for, as the API reference spells
/// it (`UnknownOperation` for none); follows the routes of [`dispatch`].
pub(crate) fn operation_name(method: &str, path: &str) -> &'static str {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        ("POST", ["thing-registration-tasks"]) => "StartThingRegistrationTask",
        ("GET", ["thing-registration-tasks"]) => "ListThingRegistrationTasks",
        ("GET", ["thing-registration-tasks", _]) => "DescribeThingRegistrationTask",
        ("PUT", ["thing-registration-tasks", _, "cancel"]) => "StopThingRegistrationTask",
        ("GET", ["thing-registration-tasks", _, "reports"]) => "ListThingRegistrationTaskReports",
        ("GET", ["endpoint"]) => "DescribeEndpoint",
        ("GET", ["things"]) => "ListThings",
        ("POST", ["things", _]) => "CreateThing",
        ("GET", ["things", _]) => "DescribeThing",
        ("PATCH", ["things", _]) => "UpdateThing",
        ("DELETE", ["things", _]) => "DeleteThing",
        ("PUT", ["things", _, "principals"]) => "AttachThingPrincipal",
        ("DELETE", ["things", _, "principals"]) => "DetachThingPrincipal",
        ("GET", ["things", _, "principals"]) => "ListThingPrincipals",
        ("GET", ["things", _, "thing-groups"]) => "ListThingGroupsForThing",
        ("GET", ["principals", "things"]) => "ListPrincipalThings",
        ("GET", ["thing-types"]) => "ListThingTypes",
        ("POST", ["thing-types", _]) => "CreateThingType",
        ("GET", ["thing-types", _]) => "DescribeThingType",
        ("POST", ["thing-types", _, "deprecate"]) => "DeprecateThingType",
        ("GET", ["thing-groups"]) => "ListThingGroups",
        ("PUT", ["thing-groups", "addThingToThingGroup"]) => "AddThingToThingGroup",
        ("POST", ["thing-groups", _]) => "CreateThingGroup",
        ("GET", ["thing-groups", _]) => "DescribeThingGroup",
        ("POST", ["billing-groups", _]) => "CreateBillingGroup",
        ("GET", ["billing-groups", _]) => "DescribeBillingGroup",
        ("GET", ["policies"]) => "ListPolicies",
        ("POST", ["policies", _]) => "CreatePolicy",
        ("GET", ["policies", _]) => "GetPolicy",
        ("DELETE", ["policies", _]) => "DeletePolicy",
        ("PUT", ["target-policies", _]) => "AttachPolicy",
        ("POST", ["target-policies", _]) => "DetachPolicy",
        ("POST", ["attached-policies", _]) => "ListAttachedPolicies",
        ("POST", ["policy-targets", _]) => "ListTargetsForPolicy",
        ("POST", ["certificates"]) => "CreateCertificateFromCsr",
        ("GET", ["certificates"]) => "ListCertificates",
        ("GET", ["certificates", _]) => "DescribeCertificate",
        ("PUT", ["certificates", _]) => "UpdateCertificate",
        ("DELETE", ["certificates", _]) => "DeleteCertificate",
        ("POST", ["certificate", "register"]) => "RegisterCertificate",
        ("POST", ["certificate", "register-no-ca"]) => "RegisterCertificateWithoutCA",
        ("GET", ["registrationcode"]) => "GetRegistrationCode",
        ("POST", ["cacertificate"]) => "RegisterCACertificate",
        ("GET", ["cacertificates"]) => "ListCACertificates",
        ("GET", ["cacertificate", _]) => "DescribeCACertificate",
        ("PUT", ["cacertificate", _]) => "UpdateCACertificate",
        ("GET", ["certificates-by-ca", _]) => "ListCertificatesByCA",
        ("POST", ["provisioning-templates"]) => "CreateProvisioningTemplate",
        ("GET", ["provisioning-templates"]) => "ListProvisioningTemplates",
        ("GET", ["provisioning-templates", _]) => "DescribeProvisioningTemplate",
        ("PATCH", ["provisioning-templates", _]) => "UpdateProvisioningTemplate",
        ("DELETE", ["provisioning-templates", _]) => "DeleteProvisioningTemplate",
        _ => "UnknownOperation",
    }
}

/// Routes a request to its operation.
pub(crate) async fn dispatch(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Value, ApiError> {
    let req = ApiRequest::read(req).await?;
    let segments: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    match (req.method.as_str(), segments.as_slice()) {
        // Bulk registration.
        ("POST", ["thing-registration-tasks"]) => start_task(shared, &req).await,
        ("GET", ["thing-registration-tasks"]) => list_tasks(shared, &req),
        ("GET", ["thing-registration-tasks", id]) => describe_task(shared, id),
        ("PUT", ["thing-registration-tasks", id, "cancel"]) => {
            task::stop(shared, id).await?;
            Ok(json!({}))
        }
        ("GET", ["thing-registration-tasks", id, "reports"]) => list_task_reports(shared, &req, id),

        // Endpoints.
        ("GET", ["endpoint"]) => describe_endpoint(shared, &req),

        // Things.
        ("GET", ["things"]) => list_things(shared, &req),
        ("POST", ["things", name]) => create_thing(shared, &req, name).await,
        ("GET", ["things", name]) => describe_thing(shared, name),
        ("PATCH", ["things", name]) => update_thing(shared, &req, name).await,
        ("DELETE", ["things", name]) => {
            let expected = req.query_int("expectedVersion")?;
            shared.store.write(|s| registry::delete_thing(s, name, expected))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("PUT", ["things", name, "principals"]) => {
            let principal = req.principal()?;
            let exclusive = req.query("thingPrincipalType") == Some("EXCLUSIVE_THING");
            shared
                .store
                .write(|s| registry::attach_thing_principal(s, name, &principal, exclusive))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("DELETE", ["things", name, "principals"]) => {
            let principal = req.principal()?;
            shared
                .store
                .write(|s| registry::detach_thing_principal(s, name, &principal))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("GET", ["things", name, "principals"]) => list_thing_principals(shared, &req, name),
        ("GET", ["things", name, "thing-groups"]) => list_thing_groups_for_thing(shared, &req, name),
        ("GET", ["principals", "things"]) => list_principal_things(shared, &req),

        // Thing types.
        ("GET", ["thing-types"]) => list_thing_types(shared, &req),
        ("POST", ["thing-types", name]) => create_thing_type(shared, &req, name).await,
        ("GET", ["thing-types", name]) => describe_thing_type(shared, name),
        ("POST", ["thing-types", name, "deprecate"]) => deprecate_thing_type(shared, &req, name).await,

        // Thing groups and billing groups.
        ("GET", ["thing-groups"]) => list_thing_groups(shared, &req),
        ("PUT", ["thing-groups", "addThingToThingGroup"]) => add_thing_to_thing_group(shared, &req).await,
        ("POST", ["thing-groups", name]) => create_thing_group(shared, &req, name).await,
        ("GET", ["thing-groups", name]) => describe_thing_group(shared, name),
        ("POST", ["billing-groups", name]) => create_billing_group(shared, &req, name).await,
        ("GET", ["billing-groups", name]) => describe_billing_group(shared, name),

        // Policies.
        ("GET", ["policies"]) => list_policies(shared, &req),
        ("POST", ["policies", name]) => create_policy(shared, &req, name).await,
        ("GET", ["policies", name]) => get_policy(shared, name),
        ("DELETE", ["policies", name]) => {
            shared.store.write(|s| registry::delete_policy(s, name))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("PUT", ["target-policies", name]) => {
            let target = target_of(&req)?;
            shared.store.write(|s| registry::attach_policy(s, name, &target))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("POST", ["target-policies", name]) => {
            let target = target_of(&req)?;
            shared.store.write(|s| registry::detach_policy(s, name, &target))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("POST", ["attached-policies", target]) => list_attached_policies(shared, &req, target),
        ("POST", ["policy-targets", name]) => list_targets_for_policy(shared, &req, name),

        // Certificates.
        ("POST", ["certificates"]) => create_certificate_from_csr(shared, &req).await,
        ("GET", ["certificates"]) => list_certificates(shared, &req),
        ("GET", ["certificates", id]) => describe_certificate(shared, id),
        ("PUT", ["certificates", id]) => {
            let status = req
                .query("newStatus")
                .ok_or_else(|| ApiError::invalid("newStatus is required"))?
                .to_owned();
            shared.store.write(|s| registry::update_certificate(s, id, &status))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("DELETE", ["certificates", id]) => {
            let force = req.query_bool("forceDelete")?.unwrap_or(false);
            shared.store.write(|s| registry::delete_certificate(s, id, force))?;
            commit(shared).await?;
            Ok(json!({}))
        }
        ("POST", ["certificate", "register"]) => register_certificate(shared, &req, true).await,
        ("POST", ["certificate", "register-no-ca"]) => register_certificate(shared, &req, false).await,

        // CA certificates.
        ("GET", ["registrationcode"]) => {
            Ok(json!({ "registrationCode": registry::registration_code(shared.config.seed) }))
        }
        ("POST", ["cacertificate"]) => register_ca_certificate(shared, &req).await,
        ("GET", ["cacertificates"]) => list_ca_certificates(shared, &req),
        ("GET", ["cacertificate", id]) => describe_ca_certificate(shared, id),
        ("PUT", ["cacertificate", id]) => update_ca_certificate(shared, &req, id).await,
        ("GET", ["certificates-by-ca", id]) => list_certificates_by_ca(shared, &req, id),

        // Provisioning templates.
        ("POST", ["provisioning-templates"]) => create_provisioning_template(shared, &req).await,
        ("GET", ["provisioning-templates"]) => list_provisioning_templates(shared, &req),
        ("GET", ["provisioning-templates", name]) => describe_provisioning_template(shared, name),
        ("PATCH", ["provisioning-templates", name]) => update_provisioning_template(shared, &req, name).await,
        ("DELETE", ["provisioning-templates", name]) => {
            shared
                .store
                .write(|s| registry::delete_provisioning_template(s, name))?;
            commit(shared).await?;
            Ok(json!({}))
        }

        _ => Err(ApiError::new(
            "UnknownOperationException",
            format!("the sandbox does not implement {} {}", req.method, req.path),
        )),
    }
}

// ---------------------------------------------------------------------------
// Bulk registration

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartTaskBody {
    template_body: Option<String>,
    input_file_bucket: Option<String>,
    input_file_key: Option<String>,
    role_arn: Option<String>,
}

fn required(value: Option<String>, name: &str) -> Result<String, ApiError> {
    value.ok_or_else(|| ApiError::invalid(format!("{name} is required")))
}

async fn start_task(shared: &Arc<Shared>, req: &ApiRequest) -> Result<Value, ApiError> {
    let body: StartTaskBody = req.json()?;
    let request = StartRequest {
        template_body: required(body.template_body, "templateBody")?,
        input_file_bucket: required(body.input_file_bucket, "inputFileBucket")?,
        input_file_key: required(body.input_file_key, "inputFileKey")?,
        role_arn: required(body.role_arn, "roleArn")?,
    };
    let task_id = task::start(shared, request).await?;
    Ok(json!({ "taskId": task_id }))
}

fn describe_task(shared: &Shared, id: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        let task = state
            .task(id)
            .ok_or_else(|| ApiError::not_found(format!("Task {id} not found")))?;
        Ok(task_json(task))
    })
}

fn task_json(task: &Task) -> Value {
    let mut out = json!({
        "taskId": task.task_id,
        "creationDate": task.creation_date,
        "lastModifiedDate": task.last_modified_date,
        "templateBody": task.template_body,
        "inputFileBucket": task.input_file_bucket,
        "inputFileKey": task.input_file_key,
        "roleArn": task.role_arn,
        "status": task.status.as_str(),
        "successCount": task.success_count(),
        "failureCount": task.failure_count(),
        "percentageProgress": task.percentage_progress(),
    });
    if let Some(message) = &task.message {
        out["message"] = json!(message);
    }
    out
}

fn list_tasks(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let status = req
        .query("status")
        .map(|s| TaskStatus::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown task status `{s}`"))))
        .transpose()?;
    // Newest first.
    let ids: Vec<String> = shared.store.read(|state| {
        state
            .tasks
            .iter()
            .rev()
            .filter(|t| status.is_none_or(|s| t.status == s))
            .map(|t| t.task_id.clone())
            .collect()
    });
    let (ids, next) = page(ids, req.query("nextToken"), req.query_int("maxResults")?, 25, 250)?;
    Ok(json!({ "taskIds": ids, "nextToken": next }))
}

fn list_task_reports(shared: &Shared, req: &ApiRequest, id: &str) -> Result<Value, ApiError> {
    let report_type = req
        .query("reportType")
        .ok_or_else(|| ApiError::invalid("reportType is required"))?;
    if report_type != "ERRORS" && report_type != "RESULTS" {
        return Err(ApiError::invalid(format!(
            "reportType must be ERRORS or RESULTS, not `{report_type}`"
        )));
    }
    let keys = shared.store.read(|state| {
        let task = state
            .task(id)
            .ok_or_else(|| ApiError::invalid(format!("Task {id} not found")))?;
        let reports = task.reports.clone().unwrap_or_default();
        Ok::<_, ApiError>(if report_type == "ERRORS" {
            reports.errors
        } else {
            reports.results
        })
    })?;
    let (keys, next) = page(keys, req.query("nextToken"), req.query_int("maxResults")?, 10, 250)?;
    let ttl = Duration::from_secs(shared.config.report_link_ttl_secs);
    let links = keys
        .iter()
        .map(|key| s3::presigned_get(&shared.endpoint_url, &shared.config.region, REPORTS_BUCKET, key, ttl))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal(format!("cannot sign a report link: {e:#}")))?;
    Ok(json!({ "resourceLinks": links, "reportType": report_type, "nextToken": next }))
}

// ---------------------------------------------------------------------------
// Endpoints

fn describe_endpoint(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let region = &shared.config.region;
    let address = match req.query("endpointType") {
        None | Some("iot:Data") => format!("sandbox.iot.{region}.localhost"),
        Some("iot:Data-ATS") => super::data_ats_address(region),
        Some("iot:CredentialProvider") => format!("sandbox.credentials.iot.{region}.localhost"),
        Some("iot:Jobs") => format!("sandbox.jobs.iot.{region}.localhost"),
        Some(other) => return Err(ApiError::invalid(format!("unknown endpointType `{other}`"))),
    };
    Ok(json!({ "endpointAddress": address }))
}

// ---------------------------------------------------------------------------
// Things

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttributePayload {
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    merge: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingBody {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    billing_group_name: Option<String>,
}

async fn create_thing(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: CreateThingBody = req.json()?;
    let config = ThingConfig {
        thing_type: body.thing_type_name,
        attributes: body.attribute_payload.unwrap_or_default().attributes,
        billing_group: body.billing_group_name,
    };
    let thing = shared
        .store
        .write(|s| registry::create_thing(s, ctx(shared), name, config))?;
    commit(shared).await?;
    Ok(json!({ "thingName": thing.thing_name, "thingArn": thing.thing_arn, "thingId": thing.thing_id }))
}

fn thing_json(thing: &Thing) -> Value {
    let mut out = json!({
        "defaultClientId": thing.thing_name,
        "thingName": thing.thing_name,
        "thingId": thing.thing_id,
        "thingArn": thing.thing_arn,
        "attributes": thing.attributes,
        "version": thing.version,
    });
    if let Some(t) = &thing.thing_type_name {
        out["thingTypeName"] = json!(t);
    }
    if let Some(b) = &thing.billing_group_name {
        out["billingGroupName"] = json!(b);
    }
    out
}

fn describe_thing(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        state
            .things
            .get(name)
            .map(thing_json)
            .ok_or_else(|| ApiError::not_found(format!("Thing {name} cannot be found")))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateThingBody {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    expected_version: Option<i64>,
    #[serde(default)]
    remove_thing_type: bool,
}

async fn update_thing(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: UpdateThingBody = req.json()?;
    let (attributes, merge) = match body.attribute_payload {
        Some(p) => (Some(p.attributes), p.merge),
        None => (None, false),
    };
    let update = ThingUpdate {
        thing_type: body.thing_type_name,
        remove_thing_type: body.remove_thing_type,
        attributes,
        merge,
        expected_version: body.expected_version,
    };
    shared.store.write(|s| registry::update_thing(s, name, update))?;
    commit(shared).await?;
    Ok(json!({}))
}

fn list_things(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let attribute_name = req.query("attributeName");
    let attribute_value = req.query("attributeValue");
    let prefix = req.query_bool("usePrefixAttributeValue")?.unwrap_or(false);
    let thing_type = req.query("thingTypeName");
    let token = req.query("nextToken");
    let size = req.query_int("maxResults")?;
    let (things, next) = shared.store.read(|state| {
        let matching: Vec<&Thing> = state
            .things
            .values()
            .filter(|t| thing_type.is_none_or(|tt| t.thing_type_name.as_deref() == Some(tt)))
            .filter(|t| match (attribute_name, attribute_value) {
                (Some(n), Some(v)) => t
                    .attributes
                    .get(n)
                    .is_some_and(|a| if prefix { a.starts_with(v) } else { a == v }),
                (Some(n), None) => t.attributes.contains_key(n),
                _ => true,
            })
            .collect();
        // Only the page is rendered: registries can hold many things.
        let (things, next) = page(matching, token, size, 50, 250)?;
        let things: Vec<Value> = things
            .into_iter()
            .map(|t| {
                let mut out = json!({
                    "thingName": t.thing_name,
                    "thingArn": t.thing_arn,
                    "attributes": t.attributes,
                    "version": t.version,
                });
                if let Some(tt) = &t.thing_type_name {
                    out["thingTypeName"] = json!(tt);
                }
                out
            })
            .collect();
        Ok::<_, ApiError>((things, next))
    })?;
    Ok(json!({ "things": things, "nextToken": next }))
}

fn list_thing_principals(shared: &Shared, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let principals: Vec<String> = shared.store.read(|state| {
        state
            .things
            .get(name)
            .map(|t| t.principals.iter().cloned().collect())
            .ok_or_else(|| ApiError::not_found(format!("Thing {name} cannot be found")))
    })?;
    let (principals, next) = page(
        principals,
        req.query("nextToken"),
        req.query_int("maxResults")?,
        25,
        250,
    )?;
    Ok(json!({ "principals": principals, "nextToken": next }))
}

fn list_principal_things(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let principal = req.principal()?;
    let things: Vec<String> = shared.store.read(|state| {
        registry::check_principal(state, &principal)?;
        Ok::<_, ApiError>(
            state
                .things
                .values()
                .filter(|t| t.principals.contains(&principal))
                .map(|t| t.thing_name.clone())
                .collect(),
        )
    })?;
    let (things, next) = page(things, req.query("nextToken"), req.query_int("maxResults")?, 25, 250)?;
    Ok(json!({ "things": things, "nextToken": next }))
}

fn list_thing_groups_for_thing(shared: &Shared, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let groups: Vec<Value> = shared.store.read(|state| {
        let thing = state
            .things
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("Thing {name} cannot be found")))?;
        Ok::<_, ApiError>(
            thing
                .thing_groups
                .iter()
                .filter_map(|g| state.thing_groups.get(g))
                .map(|g| json!({ "groupName": g.thing_group_name, "groupArn": g.thing_group_arn }))
                .collect(),
        )
    })?;
    let (groups, next) = page(groups, req.query("nextToken"), req.query_int("maxResults")?, 25, 250)?;
    Ok(json!({ "thingGroups": groups, "nextToken": next }))
}

// ---------------------------------------------------------------------------
// Thing types, thing groups, billing groups

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThingTypeProperties {
    thing_type_description: Option<String>,
    #[serde(default)]
    searchable_attributes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingTypeBody {
    thing_type_properties: Option<ThingTypeProperties>,
}

async fn create_thing_type(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: CreateThingTypeBody = req.json()?;
    let props = body.thing_type_properties.unwrap_or_default();
    let t = shared.store.write(|s| {
        registry::create_thing_type(
            s,
            ctx(shared),
            name,
            props.thing_type_description,
            props.searchable_attributes,
        )
    })?;
    commit(shared).await?;
    Ok(json!({ "thingTypeName": t.thing_type_name, "thingTypeArn": t.thing_type_arn, "thingTypeId": t.thing_type_id }))
}

fn thing_type_json(t: &ThingType) -> Value {
    let mut properties = json!({ "searchableAttributes": t.searchable_attributes });
    if let Some(d) = &t.description {
        properties["thingTypeDescription"] = json!(d);
    }
    let mut metadata = json!({ "deprecated": t.deprecated, "creationDate": t.creation_date });
    if let Some(d) = t.deprecation_date {
        metadata["deprecationDate"] = json!(d);
    }
    json!({
        "thingTypeName": t.thing_type_name,
        "thingTypeId": t.thing_type_id,
        "thingTypeArn": t.thing_type_arn,
        "thingTypeProperties": properties,
        "thingTypeMetadata": metadata,
    })
}

fn describe_thing_type(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        state
            .thing_types
            .get(name)
            .map(thing_type_json)
            .ok_or_else(|| ApiError::not_found(format!("Thing Type {ACCOUNT_ID}:{name} not found")))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeprecateBody {
    #[serde(default)]
    undo_deprecate: bool,
}

async fn deprecate_thing_type(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: DeprecateBody = req.json()?;
    shared.store.write(|state| {
        let t = state
            .thing_types
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("Thing Type {ACCOUNT_ID}:{name} not found")))?;
        t.deprecated = !body.undo_deprecate;
        t.deprecation_date = t.deprecated.then(crate::state::now);
        Ok::<_, ApiError>(())
    })?;
    commit(shared).await?;
    Ok(json!({}))
}

fn list_thing_types(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let filter = req.query("thingTypeName");
    let types: Vec<Value> = shared.store.read(|state| {
        state
            .thing_types
            .values()
            .filter(|t| filter.is_none_or(|f| t.thing_type_name == f))
            .map(thing_type_json)
            .collect()
    });
    let (types, next) = page(types, req.query("nextToken"), req.query_int("maxResults")?, 50, 250)?;
    Ok(json!({ "thingTypes": types, "nextToken": next }))
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThingGroupProperties {
    thing_group_description: Option<String>,
    attribute_payload: Option<AttributePayload>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingGroupBody {
    parent_group_name: Option<String>,
    thing_group_properties: Option<ThingGroupProperties>,
}

async fn create_thing_group(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: CreateThingGroupBody = req.json()?;
    let props = body.thing_group_properties.unwrap_or_default();
    let attributes = props.attribute_payload.unwrap_or_default().attributes;
    let g = shared.store.write(|s| {
        registry::create_thing_group(
            s,
            ctx(shared),
            name,
            body.parent_group_name,
            props.thing_group_description,
            attributes,
        )
    })?;
    commit(shared).await?;
    Ok(
        json!({ "thingGroupName": g.thing_group_name, "thingGroupArn": g.thing_group_arn, "thingGroupId": g.thing_group_id }),
    )
}

fn thing_group_json(state: &crate::state::State, g: &ThingGroup) -> Value {
    let mut properties = json!({ "attributePayload": { "attributes": g.attributes } });
    if let Some(d) = &g.description {
        properties["thingGroupDescription"] = json!(d);
    }
    // The chain of ancestors, root first.
    let mut ancestors = Vec::new();
    let mut parent = g.parent_group_name.clone();
    while let Some(p) = parent.and_then(|p| state.thing_groups.get(&p)) {
        if ancestors.len() > 8 {
            break;
        }
        ancestors.push(json!({ "groupName": p.thing_group_name, "groupArn": p.thing_group_arn }));
        parent = p.parent_group_name.clone();
    }
    ancestors.reverse();
    let mut metadata = json!({ "creationDate": g.creation_date, "rootToParentThingGroups": ancestors });
    if let Some(p) = &g.parent_group_name {
        metadata["parentGroupName"] = json!(p);
    }
    json!({
        "thingGroupName": g.thing_group_name,
        "thingGroupId": g.thing_group_id,
        "thingGroupArn": g.thing_group_arn,
        "version": g.version,
        "thingGroupProperties": properties,
        "thingGroupMetadata": metadata,
    })
}

fn describe_thing_group(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        state
            .thing_groups
            .get(name)
            .map(|g| thing_group_json(state, g))
            .ok_or_else(|| ApiError::not_found(format!("Thing Group {name} not found")))
    })
}

fn list_thing_groups(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let prefix = req.query("namePrefixFilter");
    let parent = req.query("parentGroup");
    let groups: Vec<Value> = shared.store.read(|state| {
        state
            .thing_groups
            .values()
            .filter(|g| prefix.is_none_or(|p| g.thing_group_name.starts_with(p)))
            .filter(|g| parent.is_none_or(|p| g.parent_group_name.as_deref() == Some(p)))
            .map(|g| json!({ "groupName": g.thing_group_name, "groupArn": g.thing_group_arn }))
            .collect()
    });
    let (groups, next) = page(groups, req.query("nextToken"), req.query_int("maxResults")?, 50, 250)?;
    Ok(json!({ "thingGroups": groups, "nextToken": next }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddThingToGroupBody {
    thing_group_name: Option<String>,
    thing_group_arn: Option<String>,
    thing_name: Option<String>,
    thing_arn: Option<String>,
}

/// The name in `value`, or the last `/` segment of `arn`.
fn name_or_arn(name: Option<String>, arn: Option<String>, what: &str) -> Result<String, ApiError> {
    name.or_else(|| arn.and_then(|a| a.rsplit_once('/').map(|(_, n)| n.to_owned())))
        .ok_or_else(|| ApiError::invalid(format!("{what} name or ARN is required")))
}

async fn add_thing_to_thing_group(shared: &Arc<Shared>, req: &ApiRequest) -> Result<Value, ApiError> {
    let body: AddThingToGroupBody = req.json()?;
    let group = name_or_arn(body.thing_group_name, body.thing_group_arn, "thing group")?;
    let thing = name_or_arn(body.thing_name, body.thing_arn, "thing")?;
    shared
        .store
        .write(|s| registry::add_thing_to_group(s, &thing, &group))?;
    commit(shared).await?;
    Ok(json!({}))
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BillingGroupProperties {
    billing_group_description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBillingGroupBody {
    billing_group_properties: Option<BillingGroupProperties>,
}

async fn create_billing_group(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: CreateBillingGroupBody = req.json()?;
    let description = body
        .billing_group_properties
        .unwrap_or_default()
        .billing_group_description;
    let g = shared
        .store
        .write(|s| registry::create_billing_group(s, ctx(shared), name, description))?;
    commit(shared).await?;
    Ok(
        json!({ "billingGroupName": g.billing_group_name, "billingGroupArn": g.billing_group_arn, "billingGroupId": g.billing_group_id }),
    )
}

fn describe_billing_group(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        let g = state
            .billing_groups
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("Billing Group {name} not found")))?;
        let mut properties = json!({});
        if let Some(d) = &g.description {
            properties["billingGroupDescription"] = json!(d);
        }
        Ok(json!({
            "billingGroupName": g.billing_group_name,
            "billingGroupId": g.billing_group_id,
            "billingGroupArn": g.billing_group_arn,
            "version": g.version,
            "billingGroupProperties": properties,
            "billingGroupMetadata": { "creationDate": g.creation_date },
        }))
    })
}

// ---------------------------------------------------------------------------
// Policies

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatePolicyBody {
    policy_document: Option<String>,
}

async fn create_policy(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: CreatePolicyBody = req.json()?;
    let document = required(body.policy_document, "policyDocument")?;
    let p = shared
        .store
        .write(|s| registry::create_policy(s, ctx(shared), name, &document))?;
    commit(shared).await?;
    Ok(json!({
        "policyName": p.policy_name,
        "policyArn": p.policy_arn,
        "policyDocument": p.policy_document,
        "policyVersionId": "1",
    }))
}

fn get_policy(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        let p = state
            .policies
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("Policy {name} not found")))?;
        Ok(json!({
            "policyName": p.policy_name,
            "policyArn": p.policy_arn,
            "policyDocument": p.policy_document,
            "defaultVersionId": "1",
            "creationDate": p.creation_date,
            "lastModifiedDate": p.creation_date,
            "generationId": p.generation_id,
        }))
    })
}

fn list_policies(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let ascending = req.query_bool("isAscendingOrder")?.unwrap_or(true);
    let mut policies: Vec<Value> = shared.store.read(|state| {
        state
            .policies
            .values()
            .map(|p| json!({ "policyName": p.policy_name, "policyArn": p.policy_arn }))
            .collect()
    });
    if !ascending {
        policies.reverse();
    }
    let (policies, next) = page(policies, req.query("marker"), req.query_int("pageSize")?, 50, 250)?;
    Ok(json!({ "policies": policies, "nextMarker": next }))
}

#[derive(Deserialize)]
struct TargetBody {
    target: Option<String>,
}

fn target_of(req: &ApiRequest) -> Result<String, ApiError> {
    let body: TargetBody = req.json()?;
    required(body.target, "target")
}

fn list_attached_policies(shared: &Shared, req: &ApiRequest, target: &str) -> Result<Value, ApiError> {
    let policies: Vec<Value> = shared.store.read(|state| {
        registry::check_principal(state, target)?;
        Ok::<_, ApiError>(
            state
                .policy_attachments
                .get(target)
                .into_iter()
                .flatten()
                .filter_map(|name| state.policies.get(name))
                .map(|p| json!({ "policyName": p.policy_name, "policyArn": p.policy_arn }))
                .collect(),
        )
    })?;
    let (policies, next) = page(policies, req.query("marker"), req.query_int("pageSize")?, 25, 250)?;
    Ok(json!({ "policies": policies, "nextMarker": next }))
}

fn list_targets_for_policy(shared: &Shared, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let targets: Vec<String> = shared.store.read(|state| {
        if !state.policies.contains_key(name) {
            return Err(ApiError::not_found(format!("Policy {name} not found")));
        }
        Ok(state
            .policy_attachments
            .iter()
            .filter(|(_, policies)| policies.contains(name))
            .map(|(target, _)| target.clone())
            .collect())
    })?;
    let (targets, next) = page(targets, req.query("marker"), req.query_int("pageSize")?, 25, 250)?;
    Ok(json!({ "targets": targets, "nextMarker": next }))
}

// ---------------------------------------------------------------------------
// Certificates

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CsrBody {
    certificate_signing_request: Option<String>,
}

async fn create_certificate_from_csr(shared: &Arc<Shared>, req: &ApiRequest) -> Result<Value, ApiError> {
    let body: CsrBody = req.json()?;
    let csr = required(body.certificate_signing_request, "certificateSigningRequest")?;
    let active = req.query_bool("setAsActive")?.unwrap_or(false);
    let cert = shared
        .store
        .write(|s| registry::create_certificate_from_csr(s, ctx(shared), &csr, active))?;
    commit(shared).await?;
    Ok(json!({
        "certificateArn": cert.certificate_arn,
        "certificateId": cert.certificate_id,
        "certificatePem": cert.certificate_pem,
    }))
}

fn certificate_json(c: &Certificate, mode: &str) -> Value {
    let mut out = json!({
        "certificateArn": c.certificate_arn,
        "certificateId": c.certificate_id,
        "status": c.status,
        "certificatePem": c.certificate_pem,
        "ownedBy": ACCOUNT_ID,
        "creationDate": c.creation_date,
        "lastModifiedDate": c.last_modified_date,
        "customerVersion": c.customer_version,
        "generationId": c.generation_id,
        "validity": { "notBefore": c.not_before, "notAfter": c.not_after },
        "certificateMode": mode,
    });
    if let Some(ca) = &c.ca_certificate_id {
        out["caCertificateId"] = json!(ca);
    }
    out
}

fn describe_certificate(shared: &Shared, id: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        state
            .certificates
            .get(id)
            .map(|c| json!({ "certificateDescription": certificate_json(c, &certificate_mode(state, c)) }))
            .ok_or_else(|| ApiError::not_found(format!("The certificate {id} does not exist")))
    })
}

fn list_certificates(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let ascending = req.query_bool("isAscendingOrder")?.unwrap_or(false);
    let token = req.query("marker");
    let size = req.query_int("pageSize")?;
    let (certs, next) = shared.store.read(|state| {
        let mut certs: Vec<&Certificate> = state.certificates.values().collect();
        certs.sort_by_key(|c| c.seq);
        if !ascending {
            certs.reverse();
        }
        let (certs, next) = page(certs, token, size, 25, 250)?;
        let certs: Vec<Value> = certs
            .into_iter()
            .map(|c| {
                json!({
                    "certificateArn": c.certificate_arn,
                    "certificateId": c.certificate_id,
                    "status": c.status,
                    "certificateMode": "DEFAULT",
                    "creationDate": c.creation_date,
                })
            })
            .collect();
        Ok::<_, ApiError>((certs, next))
    })?;
    Ok(json!({ "certificates": certs, "nextMarker": next }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterCertificateBody {
    certificate_pem: Option<String>,
    ca_certificate_pem: Option<String>,
    status: Option<String>,
}

async fn register_certificate(shared: &Arc<Shared>, req: &ApiRequest, with_ca: bool) -> Result<Value, ApiError> {
    let body: RegisterCertificateBody = req.json()?;
    let pem = required(body.certificate_pem, "certificatePem")?;
    let set_active = req.query_bool("setAsActive")?.unwrap_or(false);
    let status = body
        .status
        .unwrap_or_else(|| if set_active { "ACTIVE" } else { "INACTIVE" }.to_owned());
    let ca_pem = if with_ca { body.ca_certificate_pem } else { None };
    let cert = shared
        .store
        .write(|s| registry::register_certificate(s, ctx(shared), &pem, ca_pem.as_deref(), &status, with_ca))?;
    commit(shared).await?;
    Ok(json!({ "certificateArn": cert.certificate_arn, "certificateId": cert.certificate_id }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterCaBody {
    ca_certificate: Option<String>,
    verification_certificate: Option<String>,
    certificate_mode: Option<String>,
    registration_config: Option<RegistrationConfig>,
}

async fn register_ca_certificate(shared: &Arc<Shared>, req: &ApiRequest) -> Result<Value, ApiError> {
    let body: RegisterCaBody = req.json()?;
    let ca_pem = required(body.ca_certificate, "caCertificate")?;
    let mode = body.certificate_mode.unwrap_or_else(|| "DEFAULT".to_owned());
    let active = req.query_bool("setAsActive")?.unwrap_or(false);
    let auto = req.query_bool("allowAutoRegistration")?.unwrap_or(false);
    let ca = shared.store.write(|s| {
        registry::register_ca_certificate(
            s,
            ctx(shared),
            &ca_pem,
            body.verification_certificate.as_deref(),
            &mode,
            active,
            auto,
            body.registration_config,
        )
    })?;
    commit(shared).await?;
    Ok(json!({ "certificateArn": ca.certificate_arn, "certificateId": ca.certificate_id }))
}

fn ca_certificate_json(c: &CaCertificate) -> Value {
    json!({
        "certificateArn": c.certificate_arn,
        "certificateId": c.certificate_id,
        "status": c.status,
        "certificatePem": c.certificate_pem,
        "ownedBy": ACCOUNT_ID,
        "creationDate": c.creation_date,
        "autoRegistrationStatus": c.auto_registration_status,
        "lastModifiedDate": c.last_modified_date,
        "customerVersion": 1,
        "generationId": c.generation_id,
        "validity": { "notBefore": c.not_before, "notAfter": c.not_after },
        "certificateMode": c.certificate_mode,
    })
}

fn describe_ca_certificate(shared: &Shared, id: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        state
            .ca_certificates
            .get(id)
            .map(|c| {
                let mut out = json!({ "certificateDescription": ca_certificate_json(c) });
                if let Some(config) = &c.registration_config {
                    out["registrationConfig"] = json!(config);
                }
                out
            })
            .ok_or_else(|| ApiError::not_found(format!("The CA certificate {id} does not exist")))
    })
}

fn list_ca_certificates(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let ascending = req.query_bool("isAscendingOrder")?.unwrap_or(false);
    let mut certs: Vec<(u64, Value)> = shared.store.read(|state| {
        state
            .ca_certificates
            .values()
            .map(|c| {
                let summary = json!({
                    "certificateArn": c.certificate_arn,
                    "certificateId": c.certificate_id,
                    "status": c.status,
                    "creationDate": c.creation_date,
                });
                (c.seq, summary)
            })
            .collect()
    });
    certs.sort_by_key(|(seq, _)| *seq);
    if !ascending {
        certs.reverse();
    }
    let certs = certs.into_iter().map(|(_, c)| c).collect();
    let (certs, next) = page(certs, req.query("marker"), req.query_int("pageSize")?, 25, 250)?;
    Ok(json!({ "certificates": certs, "nextMarker": next }))
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateCaBody {
    registration_config: Option<RegistrationConfig>,
    #[serde(default)]
    remove_auto_registration: bool,
}

async fn update_ca_certificate(shared: &Arc<Shared>, req: &ApiRequest, id: &str) -> Result<Value, ApiError> {
    let status = req.query("newStatus").map(str::to_owned);
    let auto = req.query("newAutoRegistrationStatus").map(str::to_owned);
    let body: UpdateCaBody = req.json()?;
    shared.store.write(|state| {
        if !state.ca_certificates.contains_key(id) {
            return Err(ApiError::not_found(format!("The CA certificate {id} does not exist")));
        }
        if let Some(status) = &status {
            if status != "ACTIVE" && status != "INACTIVE" {
                return Err(ApiError::invalid(format!(
                    "newStatus must be ACTIVE or INACTIVE, not `{status}`"
                )));
            }
        }
        if let Some(auto) = &auto {
            if auto != "ENABLE" && auto != "DISABLE" {
                return Err(ApiError::invalid(format!(
                    "newAutoRegistrationStatus must be ENABLE or DISABLE, not `{auto}`"
                )));
            }
        }
        if body.remove_auto_registration && body.registration_config.is_some() {
            return Err(ApiError::invalid(
                "registrationConfig cannot be combined with removeAutoRegistration",
            ));
        }
        let config = body
            .registration_config
            .map(|config| registry::check_registration_config(state, config))
            .transpose()?;
        let Some(ca) = state.ca_certificates.get_mut(id) else {
            return Err(ApiError::not_found(format!("The CA certificate {id} does not exist")));
        };
        if let Some(status) = status {
            ca.status = status;
        }
        if let Some(auto) = auto {
            ca.auto_registration_status = auto;
        }
        if body.remove_auto_registration {
            ca.registration_config = None;
        } else if let Some(config) = config {
            ca.registration_config = Some(config);
        }
        ca.last_modified_date = crate::state::now();
        Ok(())
    })?;
    commit(shared).await?;
    Ok(json!({}))
}

/// The certificate mode of a device certificate: its CA's, or DEFAULT.
fn certificate_mode(state: &State, cert: &Certificate) -> String {
    cert.ca_certificate_id
        .as_ref()
        .and_then(|ca| state.ca_certificates.get(ca))
        .map_or_else(|| "DEFAULT".to_owned(), |ca| ca.certificate_mode.clone())
}

fn list_certificates_by_ca(shared: &Shared, req: &ApiRequest, ca_id: &str) -> Result<Value, ApiError> {
    let ascending = req.query_bool("isAscendingOrder")?.unwrap_or(false);
    let token = req.query("marker");
    let size = req.query_int("pageSize")?;
    let (certs, next) = shared.store.read(|state| {
        let mut certs: Vec<&Certificate> = state
            .certificates
            .values()
            .filter(|c| c.ca_certificate_id.as_deref() == Some(ca_id))
            .collect();
        certs.sort_by_key(|c| c.seq);
        if !ascending {
            certs.reverse();
        }
        let (certs, next) = page(certs, token, size, 25, 250)?;
        let certs: Vec<Value> = certs
            .into_iter()
            .map(|c| {
                json!({
                    "certificateArn": c.certificate_arn,
                    "certificateId": c.certificate_id,
                    "status": c.status,
                    "certificateMode": certificate_mode(state, c),
                    "creationDate": c.creation_date,
                })
            })
            .collect();
        Ok::<_, ApiError>((certs, next))
    })?;
    Ok(json!({ "certificates": certs, "nextMarker": next }))
}

// ---------------------------------------------------------------------------
// Provisioning templates

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateTemplateBody {
    template_name: Option<String>,
    description: Option<String>,
    template_body: Option<String>,
    #[serde(default)]
    enabled: bool,
    provisioning_role_arn: Option<String>,
    pre_provisioning_hook: Option<Value>,
    #[serde(rename = "type")]
    template_type: Option<String>,
}

async fn create_provisioning_template(shared: &Arc<Shared>, req: &ApiRequest) -> Result<Value, ApiError> {
    let body: CreateTemplateBody = req.json()?;
    let new = NewTemplate {
        name: required(body.template_name, "templateName")?,
        description: body.description,
        body: required(body.template_body, "templateBody")?,
        enabled: body.enabled,
        role_arn: required(body.provisioning_role_arn, "provisioningRoleArn")?,
        template_type: body.template_type.unwrap_or_else(|| "FLEET_PROVISIONING".to_owned()),
        pre_provisioning_hook: body.pre_provisioning_hook,
    };
    let template = shared
        .store
        .write(|s| registry::create_provisioning_template(s, ctx(shared), new))?;
    commit(shared).await?;
    Ok(json!({
        "templateArn": template.template_arn,
        "templateName": template.template_name,
        "defaultVersionId": 1,
    }))
}

fn template_summary(t: &ProvisioningTemplate) -> Value {
    let mut out = json!({
        "templateArn": t.template_arn,
        "templateName": t.template_name,
        "creationDate": t.creation_date,
        "lastModifiedDate": t.last_modified_date,
        "enabled": t.enabled,
        "type": t.template_type,
    });
    if let Some(d) = &t.description {
        out["description"] = json!(d);
    }
    out
}

fn describe_provisioning_template(shared: &Shared, name: &str) -> Result<Value, ApiError> {
    shared.store.read(|state| {
        let t = state
            .provisioning_templates
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("The provisioning template {name} does not exist")))?;
        let mut out = template_summary(t);
        out["defaultVersionId"] = json!(1);
        out["templateBody"] = json!(t.template_body);
        out["provisioningRoleArn"] = json!(t.provisioning_role_arn);
        if let Some(hook) = &t.pre_provisioning_hook {
            out["preProvisioningHook"] = hook.clone();
        }
        Ok(out)
    })
}

fn list_provisioning_templates(shared: &Shared, req: &ApiRequest) -> Result<Value, ApiError> {
    let templates: Vec<Value> = shared
        .store
        .read(|state| state.provisioning_templates.values().map(template_summary).collect());
    let (templates, next) = page(templates, req.query("nextToken"), req.query_int("maxResults")?, 25, 250)?;
    Ok(json!({ "templates": templates, "nextToken": next }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateTemplateBody {
    description: Option<String>,
    enabled: Option<bool>,
    default_version_id: Option<i64>,
    provisioning_role_arn: Option<String>,
    pre_provisioning_hook: Option<Value>,
    #[serde(default)]
    remove_pre_provisioning_hook: bool,
}

async fn update_provisioning_template(shared: &Arc<Shared>, req: &ApiRequest, name: &str) -> Result<Value, ApiError> {
    let body: UpdateTemplateBody = req.json()?;
    let update = TemplateUpdate {
        description: body.description,
        enabled: body.enabled,
        default_version_id: body.default_version_id,
        role_arn: body.provisioning_role_arn,
        pre_provisioning_hook: body.pre_provisioning_hook,
        remove_pre_provisioning_hook: body.remove_pre_provisioning_hook,
    };
    shared
        .store
        .write(|s| registry::update_provisioning_template(s, name, update))?;
    commit(shared).await?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names() {
        let cases = [
            ("POST", "/thing-registration-tasks", "StartThingRegistrationTask"),
            ("GET", "/thing-registration-tasks/abc", "DescribeThingRegistrationTask"),
            (
                "GET",
                "/thing-registration-tasks/abc/reports",
                "ListThingRegistrationTaskReports",
            ),
            (
                "PUT",
                "/thing-registration-tasks/abc/cancel",
                "StopThingRegistrationTask",
            ),
            ("PUT", "/thing-groups/addThingToThingGroup", "AddThingToThingGroup"),
            ("POST", "/thing-groups/g", "CreateThingGroup"),
            (
                "POST",
                "/attached-policies/arn%3Aaws%3Aiot%3Ax%2Fy",
                "ListAttachedPolicies",
            ),
            ("GET", "/things/", "ListThings"),
            ("DELETE", "/things", "UnknownOperation"),
            ("GET", "/nothing", "UnknownOperation"),
        ];
        for (method, path, name) in cases {
            assert_eq!(operation_name(method, path), name, "{method} {path}");
        }
    }

    #[test]
    fn paging() {
        let items: Vec<u32> = (0..7).collect();
        let (first, next) = page(items.clone(), None, Some(3), 10, 250).unwrap();
        assert_eq!(first, [0, 1, 2]);
        assert_eq!(next.as_deref(), Some("3"));
        let (last, next) = page(items.clone(), Some("6"), Some(3), 10, 250).unwrap();
        assert_eq!(last, [6]);
        assert_eq!(next, None);
        let (all, next) = page(items.clone(), None, None, 10, 250).unwrap();
        assert_eq!(all.len(), 7);
        assert_eq!(next, None);
        assert!(page(items.clone(), None, Some(0), 10, 250).is_err());
        assert!(page(items.clone(), None, Some(251), 10, 250).is_err());
        assert!(page(items, Some("x"), None, 10, 250).is_err());
    }
}
