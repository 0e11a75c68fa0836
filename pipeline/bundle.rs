//! Bundle: one credential directory per registered device for the flashing
//! station, and the batch manifest of SHA-256 checksums.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::PublicKeyData;
use x509_parser::prelude::*;

use crate::crypto::{sha256_hex, to_pem, KeyId};
use crate::workspace::{write_unsynced, DurableFile, Workspace};

pub const CERT_FILE: &str = "certificate.pem.crt";
pub const KEY_FILE: &str = "private.pem.key";
pub const ROOT_CA1_FILE: &str = "AmazonRootCA1.pem";
pub const ROOT_CA3_FILE: &str = "AmazonRootCA3.pem";
pub const DEVICE_FILE: &str = "device.json";

/// Amazon Root CA 1 (RSA) and 3 (ECC), taken from the Mozilla root store as
/// the `webpki-root-certs` crate ships it.
pub fn amazon_roots() -> Result<&'static (String, String), String> {
    static ROOTS: OnceLock<Result<(String, String), String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let find = |cn: &str| -> Result<String, String> {
                webpki_root_certs::TLS_SERVER_ROOT_CERTS
                    .iter()
                    .find(|der| {
                        X509Certificate::from_der(der.as_ref())
                            .ok()
                            .and_then(|(_, c)| {
                                c.subject()
                                    .iter_common_name()
                                    .next()
                                    .and_then(|a| a.as_str().ok())
                                    .map(|s| s == cn)
                            })
                            .unwrap_or(false)
                    })
                    .map(|der| to_pem("CERTIFICATE", der.as_ref()))
                    .ok_or_else(|| format!("{cn} is not in the root store"))
            };
            Ok((find("Amazon Root CA 1")?, find("Amazon Root CA 3")?))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// What goes into one bundle.
pub struct BundleInput<'a> {
    pub thing_name: &'a str,
    pub serial: &'a str,
    pub certificate_pem: &'a str,
    pub certificate_id: &'a str,
    /// None for a device-made CSR.
    pub key_pem: Option<&'a str>,
    /// The device's key as registered (from the generated key or the device CSR).
    pub key: &'a KeyId,
    pub key_type: &'a str,
    pub endpoint: &'a str,
    pub batch: &'a str,
    /// Certificates the device presents after its own (the factory CA and
    /// above), for JITP and JITR; written after the leaf, as PEM.
    pub chain_pem: Option<&'a str>,
    pub mode: &'a str,
}

#[derive(serde::Serialize)]
struct DeviceJson<'a> {
    thing_name: &'a str,
    client_id: &'a str,
    serial_number: &'a str,
    endpoint: &'a str,
    port: u16,
    certificate_id: &'a str,
    key_type: &'a str,
    private_key_on_device: bool,
    batch: &'a str,
    root_ca: [&'a str; 2],
    mode: &'a str,
    /// Whether certificate.pem.crt holds the chain after the device certificate.
    certificate_chain: bool,
}

/// How a batch's bundles are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BundleFormat {
    /// One directory per device under `bundles/`, written chunk by chunk.
    #[default]
    Dir,
    /// One `bundles.tar` per batch with the same layout inside, written once
    /// with one fsync when every device has its outcome.
    Tar,
}

pub const ARCHIVE_FILE: &str = "bundles.tar";

/// A bundle's files, name -> (bytes, mode), after the certificate is checked
/// against the device's key (a mismatch is an error, never a bundle).
/// One file of a bundle: name, bytes, mode.
pub type BundleFile = (&'static str, Vec<u8>, u32);

pub fn bundle_files(b: &BundleInput<'_>) -> Result<Vec<BundleFile>, String> {
    let cert = crate::crypto::parse_certificate_pem(b.certificate_pem)?;
    if &cert.key != b.key {
        return Err(format!(
            "device `{}`: the certificate does not carry the device's public key; no bundle written",
            b.thing_name
        ));
    }
    if cert.id != b.certificate_id {
        return Err(format!(
            "device `{}`: the certificate's SHA-256 {} is not its id {}",
            b.thing_name, cert.id, b.certificate_id
        ));
    }
    if let Some(key_pem) = b.key_pem {
        let held = held_public_key(key_pem)
            .map_err(|e| format!("device `{}`: the stored private key does not parse: {e}", b.thing_name))?;
        if &held != b.key || held != cert.key {
            return Err(format!(
                "device `{}`: the stored private key does not match the certificate; no bundle written",
                b.thing_name
            ));
        }
    }
    let (ca1, ca3) = amazon_roots()?;
    let device = DeviceJson {
        thing_name: b.thing_name,
        client_id: b.thing_name,
        serial_number: b.serial,
        endpoint: b.endpoint,
        port: 8883,
        certificate_id: b.certificate_id,
        key_type: b.key_type,
        private_key_on_device: b.key_pem.is_none(),
        batch: b.batch,
        root_ca: [ROOT_CA1_FILE, ROOT_CA3_FILE],
        mode: b.mode,
        certificate_chain: b.chain_pem.is_some(),
    };
    let mut device_json = serde_json::to_string_pretty(&device).map_err(|e| e.to_string())?;
    device_json.push('\n');
    let mut cert_pem = to_pem("CERTIFICATE", &cert.der);
    if let Some(chain) = b.chain_pem {
        for block in ::pem::parse_many(chain.as_bytes()).map_err(|e| format!("the CA chain does not parse: {e}"))? {
            cert_pem.push_str(&to_pem("CERTIFICATE", block.contents()));
        }
    }
    let mut files: Vec<BundleFile> = vec![
        (CERT_FILE, cert_pem.into_bytes(), 0o644),
        (ROOT_CA1_FILE, ca1.clone().into_bytes(), 0o644),
        (ROOT_CA3_FILE, ca3.clone().into_bytes(), 0o644),
        (DEVICE_FILE, device_json.into_bytes(), 0o644),
    ];
    if let Some(key_pem) = b.key_pem {
        let mut k = crate::crypto::normalise_pem_text(key_pem);
        if !k.ends_with('\n') {
            k.push('\n');
        }
        files.push((KEY_FILE, k.into_bytes(), 0o600));
    }
    Ok(files)
}

/// The public key of a stored private key. An EC key in PKCS#8 names its
/// public point beside the scalar, and that is read; any other key is
/// loaded whole and its public key derived.
fn held_public_key(key_pem: &str) -> Result<KeyId, String> {
    if let Ok(block) = ::pem::parse(key_pem) {
        if block.tag() == "PRIVATE KEY" {
            if let Some(key) = crate::crypto::pkcs8_ec_public_key(block.contents()) {
                return Ok(key);
            }
        }
    }
    let kp = rcgen::KeyPair::from_pem(key_pem).map_err(|e| e.to_string())?;
    KeyId::from_spki_der(&kp.subject_public_key_info())
}

/// A bundle file with its SHA-256; the two Amazon roots, the same in every
/// bundle, are hashed once per process.
fn hashed(file: BundleFile) -> (BundleFile, String) {
    static ROOTS: OnceLock<Vec<(&'static [u8], String)>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| match amazon_roots() {
        Ok((ca1, ca3)) => [ca1, ca3].map(|c| (c.as_bytes(), sha256_hex(c.as_bytes()))).to_vec(),
        Err(_) => Vec::new(),
    });
    let sha = match roots.iter().find(|(bytes, _)| *bytes == file.1.as_slice()) {
        Some((_, sha)) => sha.clone(),
        None => sha256_hex(&file.1),
    };
    (file, sha)
}

/// Writes one bundle into a temporary directory and renames it into place;
/// returns the files written with their SHA-256. Nothing is synced here:
/// [`sync_bundles`] makes a whole set durable at once.
pub fn write_bundle(ws: &Workspace, b: &BundleInput<'_>) -> Result<Vec<(PathBuf, String)>, String> {
    let files = bundle_files(b)?;
    let dir = ws.bundle_dir(b.thing_name);
    let tmp = ws
        .bundles()
        .join(format!(".tmp-{}", crate::workspace::safe_component(b.thing_name)));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut written = Vec::new();
    for (name, bytes, mode) in &files {
        write_unsynced(&tmp.join(name), bytes, *mode).map_err(|e| format!("{}: {e}", tmp.join(name).display()))?;
        written.push((dir.join(name), sha256_hex(bytes)));
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(written)
}

/// Makes every bundle written so far durable with one `syncfs` of the
/// filesystem that holds them, instead of an fsync per file and directory.
pub fn sync_bundles(ws: &Workspace) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = fs::File::open(ws.bundles())?;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// manifest.json, written as it goes: every bundle file with its SHA-256
/// and size, one entry at a time, durable when [`ManifestWriter::finish`]
/// returns. A batch of a million devices never holds its five million
/// entries in memory.
pub struct ManifestWriter {
    w: DurableFile,
    first: bool,
}

pub const MANIFEST_FILE: &str = "manifest.json";

impl ManifestWriter {
    pub fn create(ws: &Workspace, archive: bool) -> std::io::Result<ManifestWriter> {
        let mut w = DurableFile::create(&ws.dir().join(MANIFEST_FILE), 0o644)?;
        let batch = serde_json::to_string(&ws.batch).map_err(std::io::Error::other)?;
        write!(w, "{{\n  \"batch\": {batch},\n  \"algorithm\": \"sha256\",\n")?;
        if archive {
            writeln!(w, "  \"archive\": \"{ARCHIVE_FILE}\",")?;
        }
        write!(w, "  \"files\": [")?;
        Ok(ManifestWriter { w, first: true })
    }

    pub fn add(&mut self, path: &str, sha256: &str, bytes: u64) -> std::io::Result<()> {
        let path = serde_json::to_string(path).map_err(std::io::Error::other)?;
        let sep = if self.first { "" } else { "," };
        self.first = false;
        write!(
            self.w,
            "{sep}\n    {{\"path\": {path}, \"sha256\": \"{sha256}\", \"bytes\": {bytes}}}"
        )
    }

    /// Adds every file of one device's bundle directory, in name order.
    pub fn add_bundle_dir(&mut self, ws: &Workspace, thing_name: &str) -> std::io::Result<()> {
        let root = ws.dir();
        let mut files: Vec<PathBuf> = fs::read_dir(ws.bundle_dir(thing_name))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let bytes = fs::read(&f)?;
            self.add(&relative(&root, &f), &sha256_hex(&bytes), bytes.len() as u64)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        let end = if self.first { "]\n}\n" } else { "\n  ]\n}\n" };
        self.w.write_all(end.as_bytes())?;
        self.w.commit()
    }
}

/// Writes the batch's archive: every bundle under `bundles/<thing>/`, into
/// one file that is synced once when finished, with the manifest of what
/// went in, hashed while writing.
pub struct ArchiveWriter {
    builder: tar::Builder<DurableFile>,
    manifest: ManifestWriter,
    mtime: u64,
}

impl ArchiveWriter {
    pub fn create(ws: &Workspace) -> std::io::Result<ArchiveWriter> {
        let file = DurableFile::create(&ws.dir().join(ARCHIVE_FILE), 0o600)?;
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(ArchiveWriter {
            builder: tar::Builder::new(file),
            manifest: ManifestWriter::create(ws, true)?,
            mtime,
        })
    }

    /// Appends one device's bundle (checked by [`bundle_files`]).
    pub fn append(&mut self, b: &BundleInput<'_>) -> Result<(), String> {
        let files = bundle_files(b)?;
        self.append_files(b.thing_name, files)
    }

    /// Appends many bundles: checked, formatted and hashed in parallel, a
    /// slice at a time, and written in order. One result per input.
    pub fn append_all(&mut self, inputs: &[BundleInput<'_>]) -> Vec<Result<(), String>> {
        use rayon::prelude::*;
        let mut out = Vec::with_capacity(inputs.len());
        for slice in inputs.chunks(4096) {
            let made: Vec<_> = slice
                .par_iter()
                .map(|b| bundle_files(b).map(|files| files.into_iter().map(hashed).collect::<Vec<_>>()))
                .collect();
            for (input, files) in slice.iter().zip(made) {
                out.push(files.and_then(|f| self.append_hashed(input.thing_name, f)));
            }
        }
        out
    }

    /// Appends the files [`bundle_files`] made for a device.
    pub fn append_files(&mut self, thing_name: &str, files: Vec<BundleFile>) -> Result<(), String> {
        self.append_hashed(thing_name, files.into_iter().map(hashed).collect())
    }

    fn append_hashed(&mut self, thing_name: &str, files: Vec<(BundleFile, String)>) -> Result<(), String> {
        let dir = format!("bundles/{}", crate::workspace::safe_component(thing_name));
        for ((name, bytes, mode), sha256) in files {
            let path = format!("{dir}/{name}");
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(mode);
            h.set_mtime(self.mtime);
            h.set_entry_type(tar::EntryType::Regular);
            self.builder
                .append_data(&mut h, &path, bytes.as_slice())
                .map_err(|e| format!("{}: {e}", self.builder.get_ref().dest().display()))?;
            self.manifest
                .add(&path, &sha256, bytes.len() as u64)
                .map_err(|e| format!("{}: {e}", self.manifest.w.dest().display()))?;
        }
        Ok(())
    }

    /// Finishes the archive, syncs it once and renames it into place, then
    /// does the same for its manifest.
    pub fn finish(self) -> std::io::Result<()> {
        self.builder.into_inner()?.commit()?;
        self.manifest.finish()
    }
}

/// The manifest rebuilt from an archive already in place.
pub fn write_archive_manifest(ws: &Workspace) -> std::io::Result<()> {
    let mut m = ManifestWriter::create(ws, true)?;
    let mut a = tar::Archive::new(std::io::BufReader::new(fs::File::open(ws.dir().join(ARCHIVE_FILE))?));
    for e in a.entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes)?;
        m.add(&path, &sha256_hex(&bytes), bytes.len() as u64)?;
    }
    m.finish()
}

fn relative(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amazon_roots_are_the_rsa_and_ecc_roots() {
        let (ca1, ca3) = amazon_roots().unwrap();
        let c1 = crate::crypto::parse_certificate_pem(ca1).unwrap();
        let c3 = crate::crypto::parse_certificate_pem(ca3).unwrap();
        assert!(c1.subject.contains("Amazon Root CA 1"));
        assert_eq!(c1.key.algorithm, "1.2.840.113549.1.1.1");
        assert!(c3.subject.contains("Amazon Root CA 3"));
        assert_eq!(c3.key.curve.as_deref(), Some("1.2.840.10045.3.1.7"));
        assert!(ca1.ends_with("-----END CERTIFICATE-----\n") && !ca1.contains('\r'));
    }
}
