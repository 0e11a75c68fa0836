//! The S3 side: `s3s` over `s3s-fs`, objects as plain files under
//! `<state_dir>/s3/<bucket>/<key>`, plus what the IoT side needs from it
//! (reading input objects, writing report objects, pre-signing links).

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use s3s::auth::{S3Auth, SecretKey};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::S3Result;

use crate::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};

/// Accepts the sandbox credentials, and any other access key `K` with the
/// secret `K` (so the `test`/`test` pair of other emulators works too).
struct SandboxAuth;

#[async_trait::async_trait]
impl S3Auth for SandboxAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        if access_key == ACCESS_KEY_ID {
            Ok(SecretKey::from(SECRET_ACCESS_KEY))
        } else {
            Ok(SecretKey::from(access_key))
        }
    }
}

/// Builds the S3 service rooted at `root`.
pub(crate) fn service(root: &Path) -> anyhow::Result<S3Service> {
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| format!("opening the S3 root {}", root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SandboxAuth);
    Ok(builder.build())
}

/// The file behind `bucket`/`key`, or `None` when the names could escape
/// the bucket directory.
pub(crate) fn object_path(root: &Path, bucket: &str, key: &str) -> Option<PathBuf> {
    let valid_bucket = !bucket.is_empty()
        && bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && bucket != "."
        && bucket != "..";
    let key_path = Path::new(key);
    let valid_key = !key.is_empty() && key_path.components().all(|c| matches!(c, Component::Normal(_)));
    (valid_bucket && valid_key).then(|| root.join(bucket).join(key_path))
}

/// Writes an object file atomically (temporary file, fsync, rename).
pub(crate) fn write_object(root: &Path, bucket: &str, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;

    let path = object_path(root, bucket, key).with_context(|| format!("invalid object name s3://{bucket}/{key}"))?;
    let dir = path.parent().context("object path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("object")
    ));
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Characters kept verbatim by AWS's URI encoding.
const AWS_QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The same, keeping `/` for paths.
const AWS_PATH: &percent_encoding::AsciiSet = &AWS_QUERY.remove(b'/');

/// A pre-signed GET URL for `bucket`/`key` on `endpoint`, valid for `ttl`.
pub(crate) fn presigned_get(
    endpoint: &str,
    region: &str,
    bucket: &str,
    key: &str,
    ttl: Duration,
) -> anyhow::Result<String> {
    use aws_sigv4::http_request::{
        sign, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
        UriPathNormalizationMode,
    };

    let path = format!("/{bucket}/{key}");
    let path = percent_encoding::utf8_percent_encode(&path, AWS_PATH).to_string();
    let url = format!("{endpoint}{path}");

    let identity =
        aws_credential_types::Credentials::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None, None, "provline-sandbox").into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(ttl);
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .context("building the signing parameters")?
        .into();
    let request = SignableRequest::new("GET", url.clone(), std::iter::empty(), SignableBody::UnsignedPayload)
        .context("preparing the report link for signing")?;
    let (instructions, _signature) = sign(request, &params).context("signing the report link")?.into_parts();

    let query: Vec<String> = instructions
        .params()
        .iter()
        .map(|(name, value)| {
            format!(
                "{}={}",
                percent_encoding::utf8_percent_encode(name, AWS_QUERY),
                percent_encoding::utf8_percent_encode(value, AWS_QUERY)
            )
        })
        .collect();
    Ok(format!("{url}?{}", query.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_stay_inside_the_bucket() {
        let root = Path::new("/r");
        assert_eq!(object_path(root, "b", "a/c.json"), Some(PathBuf::from("/r/b/a/c.json")));
        assert_eq!(object_path(root, "b", "../x"), None);
        assert_eq!(object_path(root, "b", "/etc/passwd"), None);
        assert_eq!(object_path(root, "..", "x"), None);
        assert_eq!(object_path(root, "b/c", "x"), None);
        assert_eq!(object_path(root, "b", ""), None);
    }

    #[test]
    fn presigned_links_carry_the_sigv4_query() {
        let url = presigned_get(
            "http://127.0.0.1:9",
            "us-east-1",
            "aws-iot-bulk-reports",
            "t/results-0001.json",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(url.starts_with("http://127.0.0.1:9/aws-iot-bulk-reports/t/results-0001.json?"));
        for p in [
            "X-Amz-Algorithm=",
            "X-Amz-Credential=sandbox%2F",
            "X-Amz-Date=",
            "X-Amz-Expires=60",
            "X-Amz-Signature=",
        ] {
            assert!(url.contains(p), "{url} lacks {p}");
        }
    }
}
