//! A small registry token service (the Docker token flow): `GET /token?service=S&scope=...` with
//! HTTP Basic credentials answers `{"token": JWT}` granting the requested actions the user holds.
//! JWTs are RS256, signed with `openssl` using a key and self-signed certificate made at start;
//! the certificate goes in the token's `x5c` header and in the registry's `rootcertbundle`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use starlight_format::auth::{base64_decode, base64_encode};
use tempfile::TempDir;

use super::process::{require, tempdir};

/// The `service` and `issuer` the registry is configured with.
pub const SERVICE: &str = "starlight-test-registry";
pub const ISSUER: &str = "starlight-test-token-service";

/// A user: name, password, and `(repository, actions)` grants (`*` matches every repository).
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: String,
    pub grants: Vec<(String, Vec<String>)>,
}

impl User {
    pub fn new(name: &str, password: &str, grants: &[(&str, &[&str])]) -> User {
        User {
            name: name.into(),
            password: password.into(),
            grants: grants
                .iter()
                .map(|(r, a)| (r.to_string(), a.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }
}

/// The token service, on a loopback port, in a thread of this process.
#[derive(Debug)]
pub struct TokenServer {
    port: u16,
    dir: TempDir,
    stop: Arc<AtomicBool>,
}

/// Base64url without padding, as JWTs want it.
fn b64url(data: &[u8]) -> String {
    base64_encode(data).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
    let bin = require("openssl", "apt-get install -y openssl");
    let out =
        Command::new(bin).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("openssl: {e}"));
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

impl TokenServer {
    pub fn start(users: Vec<User>) -> TokenServer {
        let dir = tempdir("token");
        let d = dir.path();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=starlight-test-token",
            ],
            d,
        );
        let der = openssl(&["x509", "-in", "cert.pem", "-outform", "DER"], d);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, key) = (stop.clone(), d.join("key.pem"));
        let x5c = base64_encode(&der);
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = serve(s, &users, &key, &x5c);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        TokenServer { port, dir, stop }
    }

    /// The realm: where clients ask for tokens.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The certificate registries verify tokens with.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The registry configuration block for this service.
    pub fn registry_auth_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.cert().display()
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers one HTTP request (connection closed after it).
fn serve(s: std::net::TcpStream, users: &[User], key: &Path, x5c: &str) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut auth = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    let user = auth
        .as_deref()
        .and_then(|a| starlight_format::auth::credentials_for(a, "Basic"))
        .and_then(base64_decode)
        .and_then(|d| String::from_utf8(d).ok())
        .and_then(|up| {
            let (u, p) = up.split_once(':')?;
            users.iter().find(|x| x.name == u && x.password == p).cloned()
        });
    let mut w = s;
    if auth.is_some() && user.is_none() {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        return write!(
            w,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "scope" {
            continue;
        }
        let v = v
            .replace("%3A", ":")
            .replace("%3a", ":")
            .replace("%2C", ",")
            .replace("%2c", ",")
            .replace("%2F", "/");
        // repository:NAME:ACTIONS
        let mut parts = v.splitn(3, ':');
        let (Some("repository"), Some(repo), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let granted: Vec<&str> = actions
            .split(',')
            .filter(|a| {
                user.as_ref().is_some_and(|u| {
                    u.grants
                        .iter()
                        .any(|(r, acts)| (r == "*" || r == repo) && acts.iter().any(|x| x == a || x == "*"))
                })
            })
            .collect();
        access.push(serde_json::json!({"type": "repository", "name": repo, "actions": granted}));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user.as_ref().map_or("", |u| u.name.as_str()),
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let input =
        format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let sig = child.wait_with_output()?.stdout;
    let token = format!("{input}.{}", b64url(&sig));
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_has_no_padding_and_url_letters() {
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(b64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64url(b"fo"), "Zm8");
    }
}
