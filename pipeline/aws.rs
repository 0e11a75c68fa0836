//! AWS clients, from the usual aws-config chain (profiles, environment,
//! `AWS_ENDPOINT_URL`), or pointed at the sandbox.

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;

/// How to reach AWS, as the user gave it.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    /// Static credentials (the sandbox's); None uses the default chain.
    pub static_credentials: Option<(String, String)>,
}

#[derive(Clone)]
pub struct Aws {
    pub iot: aws_sdk_iot::Client,
    pub s3: aws_sdk_s3::Client,
    pub iam: aws_sdk_iam::Client,
    pub region: String,
    shared: aws_config::SdkConfig,
}

impl Aws {
    pub async fn connect(c: &Connection) -> Aws {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &c.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(p) = &c.profile {
            loader = loader.profile_name(p);
        }
        if let Some(u) = &c.endpoint_url {
            loader = loader.endpoint_url(u);
        }
        if let Some((ak, sk)) = &c.static_credentials {
            loader = loader.credentials_provider(Credentials::new(ak, sk, None, None, "provline-sandbox"));
        }
        // Throttling and 5xx answers are retried with backoff, more often
        // than the SDK's default of 3 attempts, unless AWS_MAX_ATTEMPTS (or
        // the profile) says otherwise.
        if std::env::var_os("AWS_MAX_ATTEMPTS").is_none() {
            loader = loader.retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(6)
                    .with_initial_backoff(std::time::Duration::from_millis(50))
                    .with_max_backoff(std::time::Duration::from_secs(2)),
            );
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".to_string());
        let shared = if shared.region().is_none() {
            shared
                .into_builder()
                .region(aws_config::Region::new(region.clone()))
                .build()
        } else {
            shared
        };
        // A local endpoint (sandbox, moto) serves buckets by path, not by host.
        let path_style = shared.endpoint_url().is_some();
        let s3_conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(path_style)
            .build();
        Aws {
            iot: aws_sdk_iot::Client::new(&shared),
            s3: aws_sdk_s3::Client::from_conf(s3_conf),
            iam: aws_sdk_iam::Client::new(&shared),
            region,
            shared,
        }
    }

    /// Fails early, as a configuration error, when no credentials can be
    /// found, instead of later as an unreachable endpoint.
    pub async fn check_credentials(&self) -> crate::error::Result<()> {
        use aws_credential_types::provider::ProvideCredentials;
        let Some(provider) = self.shared.credentials_provider() else {
            return Err(crate::error::Error::config(NO_CREDENTIALS));
        };
        provider
            .provide_credentials()
            .await
            .map(|_| ())
            .map_err(|e| crate::error::Error::config(format!("{NO_CREDENTIALS} ({e})")))
    }
}

const NO_CREDENTIALS: &str = "no AWS credentials found: set AWS_PROFILE or --aws-profile, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use --sandbox to run against the embedded sandbox";

/// A readable text for an SDK error: its code and message, never the raw request.
pub fn describe<E, R>(err: &aws_sdk_iot::error::SdkError<E, R>) -> String
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_iot::error::SdkError;
    match err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            format!(
                "{}: {}",
                e.code().unwrap_or("error"),
                e.message().unwrap_or("no message")
            )
        }
        SdkError::DispatchFailure(_) => format!(
            "cannot reach the endpoint: {}",
            aws_smithy_types::error::display::DisplayErrorContext(err)
        ),
        SdkError::TimeoutError(_) => "the request timed out".to_string(),
        other => format!("{}", aws_smithy_types::error::display::DisplayErrorContext(other)),
    }
}

/// Whether an SDK error is the service's fault (or the network's), not ours.
pub fn is_service_side<E, R>(err: &aws_sdk_iot::error::SdkError<E, R>) -> bool
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata,
{
    use aws_sdk_iot::error::SdkError;
    match err {
        SdkError::ServiceError(se) => matches!(
            se.err().code(),
            Some("ThrottlingException")
                | Some("Throttling")
                | Some("RequestLimitExceeded")
                | Some("ServiceUnavailable")
                | Some("ServiceUnavailableException")
                | Some("InternalFailureException")
                | Some("InternalServerException")
        ),
        _ => true,
    }
}
