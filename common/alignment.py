"""Phase-2 alignment objectives: how a student's query vectors are pulled onto the teacher's.

`--alignment_loss` names one objective or a weighted sum, e.g. `l2` (default), `cosine`, `kl`, `kernel`,
`l2+0.5*kl`. On a batch of student vectors S and the teacher's vectors T of the same queries:
- l2:     mean_i ||S_i - T_i||^2 (the paper's choice: it keeps the teacher's absolute coordinates);
- cosine: mean_i (1 - cos(S_i, T_i)) (direction only);
- kl:     mean_i KL(p_T(i) || p_S(i)), p(i) = softmax_j(<x_i, T_j> / tau) over the batch's teacher vectors
          T_j, gathered across processes (the teacher's ranking of in-batch items), or over the teacher's
          ad vectors drawn for the step (distill_student.py --corpus_file or --ad_store);
- kernel: mean_ij (<S_i, S_j> - <T_i, T_j>)^2 over the batch, gathered across processes with gradient
          (match the similarity matrices: relative structure only).
Every term is a mean over the local rows of a quantity per row against the global batch, so with DDP's
gradient averaging N processes with B/N rows each give exactly the gradient of one process with B.

`token_state_loss` matches the student's last hidden state to the teacher's at every token (students
cut from the teacher, same tokenizer and width; the teacher runs in the loop): far more signal per text
than one pooled vector, which matters when the label-free budget is small.
"""

import argparse

import torch.nn.functional as F

from common.loss import gather_no_grad, gather_with_grad

OBJECTIVES = ("l2", "cosine", "kl", "kernel")


def parse_objectives(text):
    """'l2+0.5*kl' -> [(1.0, 'l2'), (0.5, 'kl')]; an argparse type, so a bad spec is refused at once."""
    terms = []
    for term in str(text).replace(" ", "").split("+"):
        weight, _, name = term.rpartition("*")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{term!r} is not WEIGHT*NAME") from None
        if name not in OBJECTIVES:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(OBJECTIVES)}")
        if not weight > 0:
            raise argparse.ArgumentTypeError(f"the weight of {name} must be > 0")
        terms.append((weight, name))
    if len({name for _, name in terms}) != len(terms):
        raise argparse.ArgumentTypeError(f"{text!r} names an objective twice")
    return terms


def alignment_loss(student, teacher, objectives, temperature=0.05, items=None):
    """The weighted sum of the objectives on one batch; student (B, D) with gradient, teacher (B, D) fixed.

    `items` (M, D), when given, are what `kl` ranks instead of the batch's teacher vectors: the teacher's ad
    vectors (the same rows on every process), so the student learns the teacher's ranking of real ads."""
    student, teacher = student.float(), teacher.float()
    total = student.new_zeros(())
    for weight, name in objectives:
        if name == "l2":
            value = (student - teacher).pow(2).sum(dim=1).mean()
        elif name == "cosine":
            value = (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
        elif name == "kl":
            ranked = gather_no_grad(teacher) if items is None else items.float()
            target = F.log_softmax(teacher @ ranked.T / temperature, dim=1)
            predicted = F.log_softmax(student @ ranked.T / temperature, dim=1)
            value = F.kl_div(predicted, target, log_target=True, reduction="none").sum(dim=1).mean()
        else:  # kernel
            value = (student @ gather_with_grad(student).T - teacher @ gather_no_grad(teacher).T).pow(2).mean()
        total = total + weight * value
    return total


def token_state_loss(student_states, teacher_states, attention_mask):
    """mean_i [ mean over the real tokens t of text i of mean_d (S_itd - T_itd)^2 ]: every text weighs the same
    whatever its length (so N processes give the gradient of one), padding is ignored."""
    mask = attention_mask.float()
    squared = (student_states.float() - teacher_states.float()).pow(2).mean(dim=-1)  # (B, L)
    per_text = (squared * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_text.mean()
