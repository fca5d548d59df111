//! Checking the `server_url` (also `register --server`) and writing it for messages and use.

/// Check a dcmon server base URL (`server_url`, `register --server`): `http://` or `https://`
/// in any case, a host, and no user name, password, query or fragment (the agent appends
/// `/api/...` to it). The message never repeats a password.
pub fn check_server_url(text: &str) -> Result<(), String> {
    let url = text.trim();
    // The URL parser forgives `http:host` and `http:///host`; an operator who wrote them meant
    // something else, so the text itself must start with the scheme and `//host`.
    let after_scheme = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len()).filter(|s| s.eq_ignore_ascii_case(scheme)).map(|_| &url[scheme.len()..])
    });
    let parsed = reqwest::Url::parse(url).ok().filter(|u| u.has_host());
    let Some(parsed) = parsed.filter(|_| after_scheme.is_some_and(|rest| !rest.starts_with('/'))) else {
        return Err(format!(
            "expected an http:// or https:// URL such as \"http://dcmon.example:8000\", got {:?}",
            without_userinfo(url)
        ));
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "must not hold a user name or password (`user:password@` before the host; the agent \
             authenticates with the API key file), got {:?}",
            without_userinfo(url)
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "must not have a query (`?...`) or fragment (`#...`): the agent appends /api/metrics to it, got {url:?}"
        ));
    }
    Ok(())
}

/// `url` (already checked to start with a scheme and `://`) with its scheme in lower case.
pub(super) fn lowercase_scheme(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => url.to_owned(),
    }
}

/// `url` with anything before an `@` in its authority replaced by `***`, for messages.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}
