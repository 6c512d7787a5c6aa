//! Gateway errors and the one place they become HTTP: OCI error JSON
//! (`{"errors":[{"code","message"}]}`) with the status the OCI distribution spec uses.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Body, BoxError, full};

/// What the gateway itself can answer with, as opposed to what the upstream says.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("upstream registry unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream registry did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    #[error("malformed request path: {0}")]
    BadPath(String),
    #[error("not found")]
    NotFound,
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the gateway is overloaded; retry later")]
    Overloaded,
    #[error("request took longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error("the request body sent less than {} bytes in {:?}", crate::body::MIN_PROGRESS, .0)]
    BodyReadTimeout(std::time::Duration),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unavailable(String),
    /// The upstream's image cannot be converted (a hostile or unsupported layer, a bad manifest).
    #[error("cannot convert the image: {0}")]
    Unconvertible(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            GatewayError::UpstreamUnreachable(_) => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
            GatewayError::UpstreamTimeout(_) | GatewayError::Timeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE")
            }
            GatewayError::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            GatewayError::BadPath(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            GatewayError::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            GatewayError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            GatewayError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "TOOMANYREQUESTS"),
            GatewayError::BodyReadTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "UNKNOWN"),
            GatewayError::BadRequest(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            GatewayError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            GatewayError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            GatewayError::Unconvertible(_) => (StatusCode::UNPROCESSABLE_ENTITY, "MANIFEST_INVALID"),
            GatewayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }

    /// The OCI error response for this error.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        oci_error(status, code, &self.to_string())
    }

    /// Classifies an error from a lower layer by walking its `source()` chain: tower's timeout and
    /// load-shed errors and our own are recognized by type, never by message text.
    pub fn classify(err: BoxError, request_timeout: std::time::Duration) -> GatewayError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(e) = cur {
            if e.is::<tower::timeout::error::Elapsed>() {
                return GatewayError::Timeout(request_timeout);
            }
            if e.is::<tower::load_shed::error::Overloaded>() {
                return GatewayError::Overloaded;
            }
            cur = e.source();
        }
        match err.downcast::<GatewayError>() {
            Ok(g) => *g,
            Err(other) => GatewayError::Internal(other.to_string()),
        }
    }
}

/// An OCI error response.
pub fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
