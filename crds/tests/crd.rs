//! The committed CRD YAML is what the types generate, and it is a structural schema.

use serde_json::Value;

fn committed() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/partnerintegrations.tollgate.dev.yaml"
    );
    std::fs::read_to_string(path).expect("crds/partnerintegrations.tollgate.dev.yaml exists")
}

#[test]
fn committed_crd_matches_the_types() {
    let generated = tollgate_crds::crd_yaml();
    assert!(
        committed() == generated,
        "crds/partnerintegrations.tollgate.dev.yaml is stale: run `cargo run -p tollgate-crds --bin crdgen` and commit the result"
    );
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tollgate/crds/partnerintegrations.tollgate.dev.yaml"
    );
    assert!(
        path.ends_with(tollgate_crds::CHART_CRD_PATH),
        "{path} is not CHART_CRD_PATH"
    );
    let chart = std::fs::read_to_string(path).expect("the chart carries the CRD");
    assert!(
        chart == tollgate_crds::crd_yaml(),
        "{} is stale or was edited by hand: run `cargo run -p tollgate-crds --bin crdgen` and commit the result",
        tollgate_crds::CHART_CRD_PATH
    );
}

fn schema() -> Value {
    let crd: Value = serde_yaml::from_str(&committed()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Walks every node of the schema, collecting what a structural schema may not contain.
fn check(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    for banned in [
        "$ref",
        "definitions",
        "$defs",
        "$schema",
        "additionalItems",
        "patternProperties",
        "dependencies",
        "not",
    ] {
        if obj.contains_key(banned) {
            problems.push(format!(
                "{path}: {banned} is not allowed in a structural schema"
            ));
        }
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        if obj.contains_key(combinator) && !int_or_string {
            problems.push(format!(
                "{path}: {combinator} without x-kubernetes-int-or-string"
            ));
        }
    }
    if !obj.contains_key("type") && !int_or_string && !preserve {
        problems.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    if let Some(Value::Bool(false)) = obj.get("additionalProperties") {
        problems.push(format!("{path}: additionalProperties: false"));
    }
    if let Some(ty) = obj.get("type") {
        if !ty.is_string() {
            problems.push(format!("{path}: type must be one string, got {ty}"));
        }
        if ty == "array" && !obj.contains_key("items") {
            problems.push(format!("{path}: array without items"));
        }
    }
    if let Some(Value::Array(types)) = obj.get("type") {
        problems.push(format!("{path}: several types {types:?}"));
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (k, v) in props {
            check(v, &format!("{path}.{k}"), problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check(items, &format!("{path}[]"), problems);
    }
    if let Some(ap @ Value::Object(_)) = obj.get("additionalProperties") {
        check(ap, &format!("{path}{{}}"), problems);
    }
    if obj.get("x-kubernetes-list-type") == Some(&Value::String("map".into())) {
        let keys = obj["x-kubernetes-list-map-keys"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let required = obj["items"]["required"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for k in keys {
            if !required.contains(&k) {
                problems.push(format!(
                    "{path}: list-map key {k} is not required in its items"
                ));
            }
        }
    }
    // CEL rules need bounded strings and lists to pass the API server's cost estimate.
    if obj.contains_key("x-kubernetes-validations") {
        if obj.get("type") == Some(&Value::String("string".into()))
            && !obj.contains_key("maxLength")
        {
            problems.push(format!("{path}: CEL on a string without maxLength"));
        }
        if obj.get("type") == Some(&Value::String("array".into())) && !obj.contains_key("maxItems")
        {
            problems.push(format!("{path}: CEL on an array without maxItems"));
        }
    }
}

#[test]
fn schema_is_structural() {
    let mut problems = Vec::new();
    check(&schema(), "openAPIV3Schema", &mut problems);
    assert!(
        problems.is_empty(),
        "unsupported constructs:\n{}",
        problems.join("\n")
    );
}

#[test]
fn structural_check_catches_what_the_api_server_refuses() {
    // The checker itself must be able to fail.
    let bad: Value = serde_json::json!({
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "b": {"description": "no type"},
            "c": {"type": "array"},
        }
    });
    let mut problems = Vec::new();
    check(&bad, "x", &mut problems);
    assert_eq!(problems.len(), 4, "{problems:?}");
}

#[test]
fn crd_carries_the_contract() {
    let crd: Value = serde_yaml::from_str(&committed()).unwrap();
    assert_eq!(crd["spec"]["group"], "tollgate.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["pi", "pis"])
    );
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "READY", "KILL", "CIRCUIT", "RPM", "ERR%", "REFUSED", "P95", "AGE"
        ]
    );

    let spec = &schema()["properties"]["spec"]["properties"];
    for field in [
        "workloadSelector",
        "upstream",
        "killSwitch",
        "timeouts",
        "retries",
        "rateLimit",
        "circuitBreaker",
        "fallback",
        "versioning",
        "credentials",
        "routes",
        "sla",
        "telemetry",
    ] {
        assert!(
            spec[field].is_object(),
            "spec.{field} missing from the schema"
        );
    }
    let rules = serde_json::to_string(&schema()).unwrap();
    for rule in [
        "duration(self.base) <= duration(self.max)",
        "duration(self.request) <= duration(self.total)",
        "self.startsWith('https://') || self.startsWith('http://')",
        "self.contains('{value}')",
    ] {
        assert!(rules.contains(rule), "CEL rule {rule:?} missing");
    }
    assert_eq!(
        spec["routes"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert_eq!(spec["rateLimit"]["properties"]["limits"]["minItems"], 1);
    assert_eq!(
        spec["retries"]["properties"]["budget"]["properties"]["percent"]["maximum"],
        100.0
    );
    assert_eq!(
        spec["upstream"]["properties"]["connectTimeout"]["pattern"],
        tollgate_crds::v1alpha1::DURATION_PATTERN
    );
}

#[test]
fn kill_column_is_never_blank() {
    // The KILL column reads .spec.killSwitch.enabled: the API server must default the whole
    // path, or an integration whose switch was never touched shows an empty cell.
    let kill = &schema()["properties"]["spec"]["properties"]["killSwitch"];
    assert_eq!(kill["default"], serde_json::json!({}), "{kill}");
    assert_eq!(kill["properties"]["enabled"]["default"], false, "{kill}");
}
