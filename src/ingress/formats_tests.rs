use super::*;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn butter(body: &[u8]) -> Result<Parsed, FormatError> {
    parse(&Format::ButterCms, &HeaderMap::new(), body)
}

fn comet(body: &[u8]) -> Result<Parsed, FormatError> {
    parse(&Format::CometCms, &HeaderMap::new(), body)
}

#[test]
fn buttercms_fixtures_parse_to_their_events() {
    for (file, event) in [
        ("buttercms-page-published.json", "page.published"),
        ("buttercms-page-published-es.json", "page.published"),
        ("buttercms-page-delete.json", "page.delete"),
        ("buttercms-post-published.json", "post.published"),
        ("buttercms-collectionitem-published.json", "collectionitem.published"),
    ] {
        assert_eq!(butter(&fixture(file)).unwrap().event, event, "{file}");
    }
}

#[test]
fn buttercms_dedup_key_separates_locales_and_times_but_not_retries() {
    let en = butter(&fixture("buttercms-page-published.json")).unwrap();
    let es = butter(&fixture("buttercms-page-published-es.json")).unwrap();
    assert_ne!(en.dedup_key, es.dedup_key);
    // The same body again is the same key (a CMS retry, or a double click).
    assert_eq!(en, butter(&fixture("buttercms-page-published.json")).unwrap());
    // Whitespace does not matter when data.timestamp decides.
    let reformatted = String::from_utf8(fixture("buttercms-page-published.json")).unwrap().replace(',', ", ");
    assert_eq!(en.dedup_key, butter(reformatted.as_bytes()).unwrap().dedup_key);
    let later = String::from_utf8(fixture("buttercms-page-published.json"))
        .unwrap()
        .replace("2024-01-15T14:30:00\"", "2024-01-15T14:31:00\"");
    assert_ne!(en.dedup_key, butter(later.as_bytes()).unwrap().dedup_key);
}

#[test]
fn buttercms_key_falls_back_to_updated_then_body_hash() {
    let a = butter(br#"{"data":{"id":"x","updated":"u1"},"webhook":{"event":"page.published"}}"#).unwrap();
    let b = butter(br#"{"data":{"id":"x","updated":"u2"},"webhook":{"event":"page.published"}}"#).unwrap();
    assert_ne!(a.dedup_key, b.dedup_key);
    // post.published carries neither: the body decides.
    let post = butter(&fixture("buttercms-post-published.json")).unwrap();
    let other = butter(br#"{"data":{"id":"announcing-new-features","_id":5679},"webhook":{"event":"post.published"}}"#)
        .unwrap();
    assert_ne!(post.dedup_key, other.dedup_key);
}

#[test]
fn buttercms_collection_items_of_one_collection_are_distinct() {
    let a = fixture("buttercms-collectionitem-published.json");
    let b = String::from_utf8(a.clone()).unwrap().replace("_id=5678", "_id=9999");
    assert_ne!(butter(&a).unwrap().dedup_key, butter(b.as_bytes()).unwrap().dedup_key);
}

#[test]
fn buttercms_envelope_errors_name_the_field() {
    let cases: [(&[u8], &str); 6] = [
        (b"not json", "not JSON"),
        (b"[1,2]", "JSON object"),
        (br#"{"data":{}}"#, "`webhook` is missing"),
        (br#"{"data":{},"webhook":{"event":5}}"#, "`webhook.event` must be a string"),
        (br#"{"data":{},"webhook":{"event":"has space"}}"#, "printable ASCII"),
        (br#"{"data":"x","webhook":{"event":"page.published"}}"#, "`data` must be an object"),
    ];
    for (body, want) in cases {
        let err = butter(body).unwrap_err().to_string();
        assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(body));
    }
}

#[test]
fn cometcms_fixtures_and_dedup_key() {
    let published = comet(&fixture("cometcms-content-published.json")).unwrap();
    assert_eq!(published.event, "content.published");
    let deleted = comet(&fixture("cometcms-content-deleted.json")).unwrap();
    assert_eq!(deleted.event, "content.deleted");
    assert_ne!(published.dedup_key, deleted.dedup_key);
    // The slug is not part of identity: a renamed slug in a retry is the same event.
    let renamed =
        String::from_utf8(fixture("cometcms-content-published.json")).unwrap().replace("my-first-post", "renamed");
    assert_eq!(published.dedup_key, comet(renamed.as_bytes()).unwrap().dedup_key);
}

#[test]
fn cometcms_missing_and_mistyped_fields() {
    for (body, want) in [
        (r#"{"occurred_at":"t","data":{"type":"p","id":"1"}}"#, "`event` is missing"),
        (r#"{"event":"content.published","data":{"type":"p","id":"1"}}"#, "`occurred_at` is missing"),
        (r#"{"event":"content.published","occurred_at":"t","data":{"id":"1"}}"#, "`data.type` is missing"),
        (r#"{"event":"content.published","occurred_at":"t","data":{"type":"p","id":7}}"#, "`data.id` must be a string"),
        (r#"{"event":"content.published","occurred_at":"t"}"#, "`data` is missing"),
    ] {
        let err = comet(body.as_bytes()).unwrap_err().to_string();
        assert!(err.contains(want), "{body}: {err}");
    }
}

#[test]
fn generic_event_from_pointer_or_header_and_dedup_on_webhook_id() {
    let ptr = Format::Generic(EventLocator::Pointer("/type".into()));
    let body = br#"{"type":"invoice.paid","n":1}"#;
    let mut headers = HeaderMap::new();
    let by_body = parse(&ptr, &headers, body).unwrap();
    assert_eq!(by_body.event, "invoice.paid");
    headers.insert("webhook-id", "msg_1".parse().unwrap());
    let by_id = parse(&ptr, &headers, body).unwrap();
    assert_ne!(by_id.dedup_key, by_body.dedup_key);
    // Same webhook-id, different body: one message (a sender's retry).
    assert_eq!(by_id.dedup_key, parse(&ptr, &headers, br#"{"type":"invoice.paid","n":2}"#).unwrap().dedup_key);

    let hdr = Format::Generic(EventLocator::Header("x-event".parse().unwrap()));
    assert!(parse(&hdr, &headers, body).unwrap_err().to_string().contains("x-event"));
    headers.insert("x-event", "build.done".parse().unwrap());
    assert_eq!(parse(&hdr, &headers, body).unwrap().event, "build.done");
    assert!(parse(&ptr, &headers, br#"{"kind":"x"}"#).unwrap_err().to_string().contains("/type"));
    assert!(parse(&ptr, &headers, br#"{"type":["x"]}"#).is_err());
}

#[test]
fn deep_nesting_is_refused_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(butter(deep.as_bytes()), Err(FormatError::NotJson(_))));
}
