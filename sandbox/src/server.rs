//! The listener: one HTTP/1 server that routes each request to the admin
//! endpoint (paths under `/_sandbox/`), or else to the IoT emulation, the
//! IAM emulation or S3 by the service named in its SigV4 credential scope.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use s3s::service::S3Service;
use s3s::Body;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::iot::Dropped;
use crate::Shared;

/// How long open connections get to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Which emulation a request is for.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Iot,
    Iam,
    S3,
}

/// The service in a SigV4 credential `AK/DATE/REGION/SERVICE/aws4_request`.
fn credential_service(credential: &str) -> Option<&str> {
    credential.split('/').nth(3)
}

/// Routes by the service of the SigV4 credential scope, in the
/// `Authorization` header or the pre-signed `X-Amz-Credential` parameter.
fn target_of<B>(req: &Request<B>) -> Target {
    let from_header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| {
            auth.split([' ', ','])
                .find_map(|part| part.trim().strip_prefix("Credential="))
                .map(str::to_owned)
        });
    let from_query = || {
        let query = req.uri().query()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "X-Amz-Credential")
            .map(|(_, v)| v.into_owned())
    };
    match from_header.or_else(from_query).as_deref().and_then(credential_service) {
        Some("iot" | "execute-api") => Target::Iot,
        Some("iam") => Target::Iam,
        _ => Target::S3,
    }
}

async fn handle(shared: Arc<Shared>, s3: S3Service, req: Request<Incoming>) -> Result<Response<Body>, Dropped> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if crate::admin::is_admin(&path) {
        let response = crate::admin::handle(&shared, req).await;
        tracing::debug!(%method, %path, status = response.status().as_u16(), "admin request");
        return Ok(response);
    }
    let response = match target_of(&req) {
        Target::Iot => crate::iot::handle(&shared, req).await?,
        Target::Iam => crate::iam::handle(&shared, req).await,
        Target::S3 => match s3.call(req.map(Body::from)).await {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!(%method, %path, error = ?e, "S3 request failed");
                let mut response = Response::new(Body::from("internal error".to_owned()));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                response
            }
        },
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    Ok(response)
}

/// Resolves once shutdown has been asked for.
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Accepts connections until shutdown, then drains them.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, s3: S3Service) {
    let mut shutdown = shared.shutdown.clone();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let s3 = s3.clone();
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), s3.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
        connections.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>, uri: &str) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn routes_by_credential_scope() {
        let iot =
            "AWS4-HMAC-SHA256 Credential=sandbox/20260101/us-east-1/iot/aws4_request, SignedHeaders=host, Signature=00";
        let s3 =
            "AWS4-HMAC-SHA256 Credential=sandbox/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";
        assert_eq!(target_of(&request(Some(iot), "/things/x")), Target::Iot);
        assert_eq!(target_of(&request(Some(s3), "/bucket/key")), Target::S3);
        assert_eq!(target_of(&request(None, "/bucket/key")), Target::S3);
        let presigned = "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=sandbox%2F20260101%2Fus-east-1%2Fiot%2Faws4_request";
        assert_eq!(target_of(&request(None, presigned)), Target::Iot);
        let execute_api = iot.replace("/iot/", "/execute-api/");
        assert_eq!(target_of(&request(Some(&execute_api), "/things")), Target::Iot);
        let iam = iot.replace("/iot/", "/iam/");
        assert_eq!(target_of(&request(Some(&iam), "/")), Target::Iam);
    }
}
