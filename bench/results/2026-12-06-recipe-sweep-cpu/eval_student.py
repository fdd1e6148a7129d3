"""python eval_student.py MSN_FAST_EVAL_ARGS...: `msn_fast.eval` with a checkpoint's STUDENT (anchor) encoder
copied into the target encoder's place. A probe for the ninth round (is the EMA target behind the student at the
end of a run?), not part of the product. The ninth round's `*_student.json` files had their `features` field
renamed afterwards to name the student.

    python eval_student.py --checkpoint /tmp/sw9/A60_ctl --data /tmp/c10e --shots 1 2 5 --fractions --draws 10 \
        --knn-k 0 --cache /tmp/sw9/cache --no-progress --out A60_ctl_student.json
"""

import sys

import msn_fast.checkpoint as ck
from msn_fast import eval as ev

_load_model = ck.load_model


def load_student(path, device="cpu"):
    model, cfg = _load_model(path, device=device)
    model.target.load_state_dict(model.student.state_dict())
    return model, cfg


if __name__ == "__main__":
    ck.load_model = load_student  # msn_fast.eval imports it from msn_fast.checkpoint at call time
    sys.exit(ev.main(sys.argv[1:]))
