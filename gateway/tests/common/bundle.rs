//! A minimal bundle client for tests: fetches a bundle, decodes it with the verifying decoder, and
//! writes the filesystem its header and contents describe.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use futures::StreamExt;
use starlight_format::bundle::{Decoder, Event, Header};
use starlight_format::{Digest, Toc};

/// A whole, verified bundle.
#[derive(Debug)]
pub struct Fetched {
    pub header: Header,
    /// Contents received, by digest.
    pub contents: HashMap<Digest, Vec<u8>>,
    /// Content digests in the order they completed.
    pub order: Vec<Digest>,
    /// Bytes of the response body.
    pub wire_bytes: u64,
    /// Contents that came as patches against a content the client held.
    pub patched: usize,
    pub headers: reqwest::header::HeaderMap,
}

/// A refused request: status, headers, body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

/// Requests a bundle (`query` as in the URL); a POST carrying `held` when given.
pub async fn fetch(
    base: &str,
    name: &str,
    query: &str,
    creds: Option<(&str, &str)>,
    held: Option<&[Digest]>,
) -> Result<Fetched, Refused> {
    fetch_with(base, name, query, creds, held, &HashMap::new()).await
}

/// [`fetch`], with the contents the client holds (the bases of patches).
pub async fn fetch_with(
    base: &str,
    name: &str,
    query: &str,
    creds: Option<(&str, &str)>,
    held: Option<&[Digest]>,
    holds: &HashMap<Digest, Vec<u8>>,
) -> Result<Fetched, Refused> {
    let basic = creds.map(|(u, p)| move |r: reqwest::RequestBuilder| r.basic_auth(u, Some(p)));
    fetch_as(base, name, query, held, holds, &|r| match &basic {
        Some(f) => f(r),
        None => r,
    })
    .await
}

/// [`fetch_with`], with `auth` adding the caller's credentials (a bearer token, say) to the request.
pub async fn fetch_as(
    base: &str,
    name: &str,
    query: &str,
    held: Option<&[Digest]>,
    holds: &HashMap<Digest, Vec<u8>>,
    auth: &(dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Sync),
) -> Result<Fetched, Refused> {
    let url = format!("{base}/v2/{name}/_starlight/bundle?{query}");
    let client = super::http();
    let req = match held {
        Some(h) => {
            let body: String = h.iter().map(|d| format!("{d}\n")).collect();
            client.post(&url).body(body)
        }
        None => client.get(&url),
    };
    let resp = auth(req).send().await.expect("bundle request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if status != 200 {
        return Err(Refused { status, headers, body: resp.text().await.unwrap_or_default() });
    }
    let mut dec = Decoder::new();
    let (mut header, mut contents, mut order, mut partial) =
        (None, HashMap::new(), Vec::new(), HashMap::new());
    let (mut wire_bytes, mut patched) = (0u64, 0);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("bundle body");
        wire_bytes += chunk.len() as u64;
        let mut events = dec.feed(&chunk).expect("a valid bundle");
        while !events.is_empty() {
            let ev = events.remove(0);
            match ev {
                Event::Patch { index, base, size, frame } => {
                    let old = holds.get(&base).expect("a patch against a content the client holds");
                    let data =
                        starlight_format::bundle::apply_patch(old, &frame, size).expect("patch applies");
                    partial.insert(index, data.clone());
                    events.insert(0, dec.patched(index, &data).expect("patched content verifies"));
                    patched += 1;
                }
                Event::Header(h) => header = Some(*h),
                Event::Chunk { index, data, .. } => {
                    partial.entry(index).or_insert_with(Vec::new).extend_from_slice(&data)
                }
                Event::ContentDone { index, digest } => {
                    contents.insert(digest, partial.remove(&index).unwrap());
                    order.push(digest);
                }
                Event::End => {}
            }
        }
    }
    dec.finish().expect("a complete bundle");
    Ok(Fetched { header: header.unwrap(), contents, order, wire_bytes, patched, headers })
}

/// Writes the filesystem of `header` under `root`, taking contents from `contents`.
pub fn materialize(header: &Header, contents: &HashMap<Digest, Vec<u8>>, root: &Path) {
    let toc = Toc { diff_id: Digest([0; 32]), entries: header.entries.clone() };
    starlight_converter::extract::extract_layer(&toc, root, &mut |d, f| {
        let data = contents.get(d).ok_or_else(|| std::io::Error::other(format!("content {d} missing")))?;
        f.write_all(data)
    })
    .unwrap();
}
