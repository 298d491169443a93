//! Compressed answers: the daemon offers `Accept-Encoding: gzip`, and a
//! gzipped answer reads the same as a plain one. (The bytes a 100 000-member
//! list read takes either way are in BENCHMARKS.md.)

use crate::common::env;
use crm_edm_sync::domain::ListId;
use serde_json::json;

#[tokio::test]
async fn the_daemon_asks_for_gzip_and_a_gzipped_list_reads_the_same_as_a_plain_one() {
    // Arrange: 300 members in list 1.
    let e = env().await;
    for c in 1..=300i64 {
        e.sb.crm
            .put_customer(c, json!({"name": format!("公司 & {c}"), "type_id": 1}));
        e.sb.crm.put_linkman(
            c,
            c * 10,
            json!({"name": format!("人 <{c}>"), "email": format!("p{c}@example.com")}),
        );
    }
    e.sync().await;
    let url = format!(
        "{}/mloperate.php?do=ml-addr-list&list_id=1&limit=1000&username={}&password={}",
        e.sb.edm_url,
        crm_edm_sync::sandbox::EDM_USER,
        crm_edm_sync::edm::password_md5(crm_edm_sync::sandbox::EDM_PASSWORD)
    );
    let raw = crm_edm_sync::remote::client_builder()
        .no_gzip()
        .build()
        .unwrap();

    // Act
    let asked = e.sb.edm.requests_accepting_gzip();
    let gzipped = e.ctx.edm.addr_all(ListId(1)).await.unwrap();
    let asked_after = e.sb.edm.requests_accepting_gzip();
    let wire = raw
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    let encoding = wire.headers().get("content-encoding").cloned();
    let wire_body = wire.bytes().await.unwrap();
    e.sb.edm.compress_answers(false);
    let plain = e.ctx.edm.addr_all(ListId(1)).await.unwrap();

    // Assert
    assert!(asked_after > asked, "the client did not offer gzip");
    assert_eq!(encoding.as_ref().map(|v| v.to_str().unwrap()), Some("gzip"));
    assert_eq!(&wire_body[..2], [0x1f, 0x8b], "a gzip stream");
    assert_eq!(gzipped.len(), 300);
    assert_eq!(gzipped, plain);
}
