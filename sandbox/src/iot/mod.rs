//! The AWS IoT control-plane emulation (REST-JSON, as the botocore model
//! and `aws-sdk-iot` define it).

pub(crate) mod admission;
mod api;
mod provision;
mod registry;
pub(crate) mod task;
mod template;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use s3s::Body;

use std::sync::Arc;

use crate::{Fault, Shared};

/// The `iot:Data-ATS` address DescribeEndpoint answers, which the device
/// endpoint's server certificate names.
pub(crate) fn data_ats_address(region: &str) -> String {
    format!("sandbox-ats.iot.{region}.localhost")
}

/// An IoT API error: the modelled error code, which fixes the HTTP status,
/// and a message.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiError {
    pub code: &'static str,
    pub message: String,
    /// `resourceId` and `resourceArn` of `ResourceAlreadyExistsException`.
    pub resource: Option<(String, String)>,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            resource: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new("InvalidRequestException", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new("ResourceNotFoundException", message)
    }

    pub fn already_exists(message: impl Into<String>, id: &str, arn: &str) -> ApiError {
        ApiError {
            resource: Some((id.to_owned(), arn.to_owned())),
            ..ApiError::new("ResourceAlreadyExistsException", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new("InternalFailureException", message)
    }

    /// The HTTP status the service model gives this error.
    pub fn status(&self) -> StatusCode {
        let code = match self.code {
            "ResourceNotFoundException" | "NotConfiguredException" | "UnknownOperationException" => 404,
            "ResourceAlreadyExistsException"
            | "CertificateConflictException"
            | "ConflictingResourceUpdateException"
            | "DeleteConflictException"
            | "VersionConflictException"
            | "VersionsLimitExceededException" => 409,
            "CertificateStateException" => 406,
            "UnauthorizedException" => 401,
            "LimitExceededException" => 410,
            "InternalFailureException" => 500,
            "ServiceUnavailableException" => 503,
            _ => 400,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
    }

    fn into_response(self) -> Response<Body> {
        let mut body = serde_json::json!({ "message": self.message });
        if let Some((id, arn)) = &self.resource {
            body["resourceId"] = id.clone().into();
            body["resourceArn"] = arn.clone().into();
        }
        let mut response = Response::new(Body::from(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert("x-amzn-ErrorType", http::HeaderValue::from_static(self.code));
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The connection must be closed without a response (an injected fault).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by an injected fault")]
pub(crate) struct Dropped;

/// Handles one IoT request, with the fault armed for it or drawn for it
/// under the fault plan, if any; counts it in the stats.
pub(crate) async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Dropped> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let operation = api::operation_name(method.as_str(), &path);
    let fault = shared.faults.for_call(operation, method.as_str(), &path);
    if let Some(fault) = fault {
        tracing::debug!(%method, %path, operation, ?fault, "injecting a fault");
    }
    let error = match fault {
        None => return Ok(respond(shared, req, &method, &path).await),
        Some(Fault::DropConnection) => return Err(Dropped),
        Some(Fault::DropResponse) => {
            respond(shared, req, &method, &path).await;
            return Err(Dropped);
        }
        Some(Fault::Throttling) => ApiError::new("ThrottlingException", "Rate exceeded"),
        Some(Fault::ServiceUnavailable) => ApiError::new("ServiceUnavailableException", "Service unavailable"),
        Some(Fault::InternalFailure) => ApiError::internal("Internal failure"),
    };
    Ok(error.into_response())
}

async fn respond(shared: &Arc<Shared>, req: Request<Incoming>, method: &http::Method, path: &str) -> Response<Body> {
    match api::dispatch(shared, req).await {
        Ok(body) => {
            let mut response = Response::new(Body::from(body.to_string()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(%method, %path, error = %e, "IoT request failed");
            } else {
                tracing::debug!(%method, %path, error = %e, "IoT request refused");
            }
            e.into_response()
        }
    }
}
