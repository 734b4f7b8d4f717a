"""Notebook 03's closing findings, built from the run's own verdicts: ``rope_findings``."""

from __future__ import annotations

from shortlab.findings import Finding, significant
from shortlab.rope_experiment.from_scratch import from_scratch_families
from shortlab.rope_experiment.measurements import interval_from
from shortlab.stats import CANNOT_TELL, describe, sample_size_to_tell


def _to_tell(claim: dict, n: int, threshold: float, claim_side: str, margin: float = 0.0, unit: str = "trials") -> str:
    if claim.get("reason"):
        return f"Cannot be judged: {claim['reason']}"
    size = sample_size_to_tell(interval_from(claim), n, threshold, margin=margin, claim=claim_side)
    return ("no sample size decides it: the estimate sits on the edge" if size is None
            else f"about {significant(size)} {unit} instead of {n:,} would decide it")


# the from-scratch families' claims (``from_scratch_families``' keys) as sentences
_FAMILY_CLAIMS = {"fails beyond the bound": "passkey retrieval fails beyond the bound",
                  "drops more than the control's": "retrieval drops beyond the bound more than the control's does",
                  "perplexity comparable to the control's": "perplexity stays comparable to the control's",
                  "retrieval holds up to the bound": "retrieval holds up to the bound"}
CENTRAL_CLAIM = _FAMILY_CLAIMS["fails beyond the bound"]  # the paper's claim, judged on the small models from scratch


def central_finding(findings: list[Finding]) -> Finding | None:
    """The from-scratch family's verdict on the paper's central claim (a base whose bound lies
    inside the context fails beyond the bound), the lead of "In short"; None when absent."""
    return next((f for f in findings if f.claim.startswith("For small Llamas") and f.claim.endswith(CENTRAL_CLAIM)), None)


def rope_findings(scratch: dict | None, finetunes: list[dict], passkey: dict | None, paper: dict,
                  practical: dict) -> tuple[list[Finding], list[str]]:
    """(findings, departures from the paper) of notebook 03 from ``summarize``'s result
    (``scratch``), the ``finetune_summary`` s, the real model's ``shipped_bound_verdict``
    (``passkey``), ``paper_numbers("rope_base")`` and the practical sizes used."""
    findings, departures = [], []
    margin = practical["accuracy_margin"]
    if scratch is not None:
        models = (scratch.get("pretrained") or {}).get("models", 1)
        who = ("small Llamas pretrained once" if models == 1
               else f"small Llamas pretrained {models} times independently")
        for claim, family in from_scratch_families(scratch).items():
            counts = family.counts(adjusted=True)
            outcome = max(counts, key=lambda o: (counts[o], o != CANNOT_TELL))
            per_base = "; ".join(f"{name}: {v}" for name, v in family.holm.items())
            share = (f"all {len(family.holm)}" if counts[outcome] == len(family.holm)
                     else f"{counts[outcome]} of {len(family.holm)}")
            findings.append(Finding(
                f"For {who} and fine-tuned with bases whose bound lies inside the context, {_FAMILY_CLAIMS[claim]}",
                outcome, detail=f"{describe(outcome)} for {share} bases after Holm's adjustment ({per_base})",
                practical={"fails beyond the bound": f"(accuracy below the halfway level {scratch['halfway_level']:.2f})",
                           "drops more than the control's": f"by more than {margin} in accuracy",
                           "perplexity comparable to the control's": f"(a ratio below {practical['ppl_tolerance']})",
                           "retrieval holds up to the bound": f"(halving no earlier than {1 - practical['ratio_margin']:g} × L_θ)",
                           }.get(claim, ""), margin=margin))
        rules = scratch["rules"]
        departures.append(f"Every small-model accuracy stands beside chance {rules['uniform guess']:.2f} and the "
                          f"strongest rule that needs no model, {rules['most common record value']:.2f}")
    for finetune in finetunes:
        label = f"{finetune['model']['label']} ({finetune['parameters']['task_fraction']:.0%} passkey rows)"
        for run in finetune["runs"]:
            if run["control"] or run["verdict"]["fails_beyond"] is None:
                continue
            claim = run["verdict"]["fails_beyond"]
            n = sum(row["n"] for row in run["passkey"] if run["bound"] < row["distance"] <= finetune["context"])
            findings.append(Finding(
                f"{label} with base {run['base']:g}: retrieval fails beyond its bound {run['bound']:,} "
                f"(found within {claim['within']['estimate']:.2f}, beyond {claim['beyond']['estimate']:.2f})",
                claim["verdict"], interval_from(claim["beyond"]),
                practical=f"(a rate beyond it below {claim['halfway_level']:.2f}, judged only for a model that retrieves within it)",
                to_tell=_to_tell(dict(claim["beyond"], reason=claim["reason"]), n, claim["halfway_level"], "below")))
            half = run["half_accuracy"]
            if half is not None and "verdict" in half:
                over = half["over_bound"]
                findings.append(Finding(
                    f"{label} with base {run['base']:g}: retrieval holds up to the bound (half-accuracy distance over "
                    f"L_θ: {'beyond the probed distances' if over['estimate'] is None else format(over['estimate'], '.2f')})",
                    half["verdict"], practical=f"(halving no earlier than {1 - half['ratio_margin']:g} × L_θ)",
                    to_tell=half.get("reason", "")))
            ratio = run["verdict"]["perplexity_ratio"]
            findings.append(Finding(f"{label} with base {run['base']:g}: perplexity comparable to the control's",
                                    ratio["verdict"], interval_from(ratio),
                                    practical=f"(a ratio below {finetune['ppl_tolerance']:g})",
                                    to_tell=_to_tell(ratio, len(run["perplexity"]["rows"]["nll_sum"]),
                                                     finetune["ppl_tolerance"], "below", unit="held-out rows")))
    for finetune in finetunes:  # the untouched model on the fine-tuning script's passkey grid
        shipped = finetune.get("shipped")
        claim = None if shipped is None or shipped.get("verdict") is None else shipped["verdict"].get("fails_beyond")
        if claim is not None:
            findings.append(Finding(
                f"The shipped model's passkey on {finetune['model']['label']}'s grid fails beyond its own bound "
                f"{shipped['bound']:,} (found within {claim['within']['estimate']:.2f}, beyond "
                f"{claim['beyond']['estimate']:.2f})", claim["verdict"], interval_from(claim["beyond"]),
                practical=f"(a rate beyond it below {claim['halfway_level']:.2f})",
                to_tell=_to_tell(dict(claim["beyond"], reason=claim["reason"]), shipped["verdict"]["beyond"]["n"],
                                 claim["halfway_level"], "below")))
    if passkey is not None:
        claim = passkey["fails_beyond"]
        n = passkey["beyond"]["n"]
        findings.append(Finding(f"The shipped model's passkey in this notebook's section 6 fails beyond its own bound "
                                f"(found within {claim['within']['estimate']:.2f}, beyond {claim['beyond']['estimate']:.2f}; "
                                "its prompts and distances differ from the fine-tuning grid's)", claim["verdict"],
                                interval_from(claim["beyond"]),
                                practical=f"(a rate beyond it below {claim['halfway_level']:.2f})",
                                to_tell=_to_tell(dict(claim["beyond"], reason=claim["reason"]), n,
                                                 claim["halfway_level"], "below")))
    tuning = paper["fine_tuning"]
    departures.append(f"The paper ({tuning['source']}) reports: {tuning['finding']}; here the models are far smaller "
                      "and the contexts shorter, so its numbers are not reproduced one for one")
    scratch_paper = paper["from_scratch"]
    departures.append(f"Its from-scratch model ({scratch_paper['source']}) {scratch_paper['finding']}")
    return findings, departures


def published_departure(rows: list[dict]) -> str:
    """How the paper's own table of smallest bases fares against its criterion (``rows``:
    ``report.published_verdicts``), as one "beside the paper" sentence ("" without rows)."""
    if not rows:
        return ""
    every = [row["context"] for row in rows if row["finding"] == "holds under every convention"]
    some = [row["context"] for row in rows if row["finding"].startswith("holds only with")]
    fails = [row["context"] for row in rows if row["finding"].startswith("fails")]
    parts = [f"under every convention for {len(every)} of {len(rows)} contexts"]
    if some:
        parts.append(f"only under some conventions (1K = 1,000 or 1,024 tokens, the context's last position counted "
                     f"or not) for {len(some)} ({', '.join(some)})")
    if fails:
        parts.append(f"under none for {len(fails)} ({', '.join(fails)}): there B(m) turns negative inside the context")
    return "Checked against its own criterion, the paper's table of smallest bases holds " + "; ".join(parts)
