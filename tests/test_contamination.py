"""The contamination detector finds planted overlaps and none in clean files."""
import json
import random

from megatron_sz.evaluation.contamination import ContaminationIndex, load_problem_texts

WORDS = ("apple river seven blue quickly triangle number garden paint circle prime square "
         "marble ladder window orange silver engine planet candle forest bridge pencil").split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(n))


def test_planted_overlaps_are_found_and_clean_texts_pass(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    bench = [_sentence(rng, rng.randint(15, 40)) for _ in range(50)]
    bench.append("Find x.")  # shorter than 13 words: compared whole
    clean = [_sentence(rng, rng.randint(15, 40)) for _ in range(40)]
    # 13 shared words inside a long unrelated text: an n-gram hit, far from a near-duplicate
    planted_ngram = ("Consider this: " + " ".join(bench[7].split()[2:15]) + " and then "
                     + " ".join(f"word{i}" for i in range(60)))
    words = bench[21].split()
    words[3] = "changed"
    planted_near = " ".join(words)
    planted_short = "find X."
    cands = clean + [planted_ngram, planted_near, planted_short]
    index = ContaminationIndex(bench, ngram=13, near_dup_threshold=0.6)
    hits = {h.candidate_index: h for h in index.report(cands)}
    assert set(hits) == {40, 41, 42}, hits
    assert hits[40].reference_index == 7 and hits[40].kind == "ngram"
    assert hits[41].reference_index == 21 and hits[41].kind == "near_duplicate"
    assert hits[42].reference_index == 50
    # file loading in a public layout
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in bench))
    assert load_problem_texts(path) == bench
