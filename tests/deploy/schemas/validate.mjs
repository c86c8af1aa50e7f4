// Reads a JSON array of KEDA objects on stdin and validates each against the schema generated from KEDA's CRDs
// (@kubernetes-models/keda). Prints one line per object; exits 1 when any is invalid.
import { readFileSync } from "node:fs";
import { ScaledJob, ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const kinds = { ScaledObject, ScaledJob, TriggerAuthentication };
let failed = false;
for (const obj of JSON.parse(readFileSync(0, "utf8"))) {
  const Kind = kinds[obj.kind];
  const name = `${obj.kind}/${obj.metadata?.name}`;
  try {
    if (!Kind) throw new Error("not a KEDA kind this checks");
    new Kind(obj).validate();
    console.log(`valid ${name}`);
  } catch (err) {
    console.log(`invalid ${name}: ${err.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
