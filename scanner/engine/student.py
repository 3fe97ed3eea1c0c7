"""The distilled student: fresh prompts tuned to agree with the suspect on clean OOD photos alone.

Every clean prompt-tuned model of a small CLIP has natural triggers: a patch that draws evidence the tuned
prompts have learned to read (a colour task's "gray" from a grey square) moves held-out photos into the class
by a wide margin, as a planted trigger does. The zero-shot twin does not share them, because plain prompts
never learned that evidence. A student does: class-specific CoOp prompts of the suspect's shape, started from
random context and tuned only to match the suspect's softmax on clean OOD photos, relearn what the suspect
does with evidence those photos exercise. A planted patch lives in feature directions clean photos do not
exercise (the backdoor sleeps on them), so the student does not relearn it.

Measured before any rule was written (``runs/s32/student.py``, not shipped; seed-21 p7 zoo, CI's own patch
trigger for its candidate, median margin in suspect / student): ``colours/clean-0``, a false positive of
today's rule, 7.4 / 7.4; the BadNets targets of shapes, colours and letters 1.2 / -11.6, 8.2 / -4.2 and
2.2 / -17.3. A noise blend over the whole image is another matter: the real Blended trigger moves the student
as far as the suspect (its feature shift is one clean photos exercise), though CI's own patch for those
targets still moves the suspect further (0.1 / -1.8, 2.1 / -3.9, 7.6 / 5.0).

An option, not the default: the ``"patch-student"`` score (``engine/ci.py``) that reads it changed no verdict on
the two zoos it was judged on (docs/preregistrations.md, session 32), so the student's evidence is recorded for
later rules. Image-conditioned learners (CoCoOp) have no fixed class prompts to relearn, so they get no student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner

STUDENT_SEED = 7  # the student's random context: its own generator, so the searches' draws do not move
STUDENT_BLOCK = 16  # classes whose prompts go through the text encoder per distillation step


class StudentModel:
    """A fixed cosine classifier: text features (C, E), normalised, and the logit scale."""

    def __init__(self, text: torch.Tensor, scale: float, agreement: float) -> None:
        self.text = F.normalize(text.float(), dim=-1)  # (C, E)
        self.scale = scale
        self.agreement = agreement  # top-1 agreement with the suspect on the photos it was distilled on

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from image features (B, E), raw or normalised."""
        f = F.normalize(image_features.float(), dim=-1)
        return self.scale * f @ self.text.to(f.device).T


def distil_student(model: PromptedCLIP, clean_features: torch.Tensor, steps: int, lr: float,
                   seed: int = STUDENT_SEED) -> StudentModel:
    """Class-specific CoOp prompts of the suspect's context length, from random context, tuned by Adam on all
    ``clean_features`` (N, E) at once to minimise KL(suspect softmax || student softmax).

    Every class is learned again, not the candidate's alone: a planted backdoor also lives in the other classes'
    prompts (they were taught that triggered images are not theirs), and a student that kept those would hand
    triggered photos to the relearned target by default. Up to ``STUDENT_BLOCK`` classes go through the text
    encoder per step (with more, a block that rotates over the classes; the rest of the rows are their latest
    values, held fixed for that step), so the cost does not grow with the class count."""
    src = model.learner
    if src.image_conditioned:
        raise ValueError("a student relearns the fixed class prompts: image-conditioned learners have none")
    n_cls = src.n_cls
    learner = CoOpLearner(model.backbone, src.classnames, n_ctx=src.n_ctx, csc=True,
                          class_token_position=src.class_token_position, seed=seed).to(model.device)
    f = F.normalize(clean_features.float(), dim=-1).to(model.device)  # (N, E)
    with torch.no_grad():
        target = model.logits_from_features(clean_features.to(model.device)).float().softmax(dim=-1)  # (N, C)
        rows = F.normalize(learner.text_features().float(), dim=-1)  # (C, E): every class's latest text feature
    scale = float(model.backbone.logit_scale)
    opt = torch.optim.Adam([learner.ctx], lr=lr)
    block = min(STUDENT_BLOCK, n_cls)
    with torch.enable_grad():
        for step in range(steps):
            idx = (torch.arange(block) + step * block) % n_cls  # (b,): this step's classes
            own = _block_features(learner, idx, block < n_cls)  # (b, E)
            text = rows.index_put((idx.to(rows.device),), own)  # (C, E), gradient through this step's rows
            loss = F.kl_div((scale * f @ text.T).log_softmax(dim=-1), target, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows[idx] = own.detach()
    with torch.no_grad():
        final = F.normalize(learner.text_features().float(), dim=-1)
        agree = float(((f @ final.T).argmax(1) == target.argmax(1)).float().mean())
    return StudentModel(final.cpu(), scale, agree)


def _block_features(learner: CoOpLearner, idx: torch.Tensor, partial: bool) -> torch.Tensor:
    """(b, E) normalised text features of classes ``idx`` (all of them, in order, when not ``partial``)."""
    if not partial:
        return F.normalize(learner.text_features().float(), dim=-1)
    prompts = learner.assemble(learner.ctx)[idx]  # (b, L, D): assembling every class is a concatenation, cheap
    eot = learner.eot_index[idx]
    return F.normalize(learner.backbone.encode_prompts(prompts[:, : learner.text_length], eot).float(), dim=-1)
