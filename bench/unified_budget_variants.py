"""The variants ``bench/unified_budget.py`` can run: one row each, named as on its command line.

Kept apart from the runner so the table (one row per experiment since session 5, with the
question each asked) does not bury the loop that runs them. A row's fields are read by
``run_variant``; add a field here and read it there.
"""
from __future__ import annotations

from typing import NamedTuple

DEMO_MIX = {"vqa": 6.0, "caption": 1.0, "chat": 1.0, "t2i": 4.0, "text": 0.5}
# Multi-question conversations instead of single questions (as LLaVA-1.5 packs an image's VQA
# questions into one conversation): ~5 supervised answers per image for ~1.3x the tokens.
MULTI_QA_MIX = {"vqa": 1.0, "caption": 1.0, "chat": 6.0, "t2i": 4.0, "text": 0.5}

# The demo's recipe since session 18 (configs/unified/tiny.yaml): 5-question chats, image-id rows
# from their bits, image targets at weight 0.25, row/column embeddings, logits at labelled
# positions only, Muon on the decoder's matrices. Rows from session 19 on start from it.
MUON_RECIPE = dict(chat_turns=5, max_length=224, bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                   muon=True)
PLACE_COLOUR_QUESTION = "What colour is the object "  # ShapesWorld's colour questions naming a place


class Variant(NamedTuple):
    preset: str
    steps: int
    lr: float
    mixture: dict
    chat_turns: int = 3
    max_length: int = 192
    batch: int = 0  # 0: --batch
    bit_init: bool = False  # image-id embeddings initialised from their bit patterns
    image_weight: float = 1.0  # loss weight of image-id targets (unified_mm.loss.weighted_mean_loss)
    pos2d: bool = False  # row + column + group embeddings at image ids (unified_mm/image_positions.py)
    cpu_bf16: bool = False  # bf16 autocast of the training forward on CPU (fp32 weights and optimizer)
    one_group: bool = False  # all of a patch's bits as ONE image id (G=1, 2^L ids): half the image ids per image
    overrides: dict = {}  # LlamaConfig fields over the preset row (UnifiedModelConfig.overrides)
    # > 0: the image ids of understanding prompts (vqa, chat, caption) are targets too, at this
    # weight: image modelling at no extra forward cost (their logits are computed anyway)
    prompt_image_weight: float = 0.0
    # > 0: ShapesWorld samples carry this many rounds of the generator's QA builders (one question
    # of each type per round, duplicates dropped), redrawn from the scene in the sample's metadata
    # with a per-image seed, as if the data had been generated with that many rounds
    qa_rounds: int = 0
    # logits only at labelled positions (unified_mm.loss.modality_token_losses_from_hidden)
    hidden_loss: bool = False
    # non-empty: training questions are only these ShapesWorld types (e.g. ("yesno",)); the
    # evaluation still asks every type
    qa_types: tuple = ()
    # user turns render their text before their image (<user> {question} <boi> img <eoi>), so the
    # image ids can attend to the question: does that help the model find the object it names?
    text_first: bool = False
    # > 0: for the first this many steps, training draws only one-object images (reading an
    # attribute without having to find the named object first), then every image (a curriculum)
    single_object_steps: int = 0
    # Muon (train.optim.MuonAdamW) on the decoder layers' weight matrices, AdamW on the rest
    muon: bool = False
    # the user turns' text (the questions) is labelled too, not only the answers: predicting
    # "red" in "Is the object on the left red?" from the image is a first-order signal that
    # builds the colour read-out where the yes/no answer needs it (answers alone give none:
    # yes/no is balanced, so neither the image nor the question alone predicts it)
    question_labels: bool = False
    # > 0: this fraction of chats open with a scaffold pair (use_yesno_scaffold): "What colour is
    # the object <place>?" and then "Is the object <place> <colour>?" about the same object
    yesno_scaffold: float = 0.0
    # with bit_init: share of each image row's variance kept from its random init
    # (UnifiedModelConfig.image_embedding_random): a direction per id, for shapes
    bit_random: float = 0.0
    # decoupled weight decay of the matrices (the trainer's optim.weight_decay)
    weight_decay: float = 0.1
    # > 0: the query and key projections start this many times larger (sharper attention from
    # the first step: does the named lookup need larger attention logits to get going?)
    qk_init_scale: float = 0.0
    # non-empty: of the questions kept by qa_types, only those starting with this text (e.g.
    # "What colour is the object " = colour questions naming the object by its place)
    question_prefix: str = ""
    # > 0: chats about several-object images get this many extra colour / shape / position
    # questions drawn fresh from the scene (use_lookup_questions): more lookups per step
    lookup_questions: int = 0
    # > 0: chats get this many extra "What is <place>?" questions ("nothing" for an empty cell,
    # else "a <colour> <shape>"; use_place_questions): a first-order target for reading a cell by
    # its place, which yes/no's "Is there an object <place>?" lacks
    place_questions: int = 0


VARIANTS = {
    "mix_600": Variant("tiny", 600, 2e-3, DEMO_MIX),
    "mix_750": Variant("tiny", 750, 2e-3, DEMO_MIX),
    "mix_2k": Variant("tiny", 2000, 2e-3, DEMO_MIX),
    "mix_6k": Variant("tiny", 6000, 2e-3, DEMO_MIX),
    "vqa_heavy_6k": Variant("tiny", 6000, 2e-3, {"vqa": 12.0, "caption": 1.0, "chat": 2.0, "t2i": 2.0, "text": 0.5}),
    "lr1e-3_6k": Variant("tiny", 6000, 1e-3, DEMO_MIX),
    "small_3k": Variant("small", 3000, 1e-3, DEMO_MIX),
    "multiqa_750": Variant("tiny", 750, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224),
    "multiqa_b16_1500": Variant("tiny", 1500, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, batch=16),
    "multiqa_bits_b16_1500": Variant("tiny", 1500, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, batch=16,
                                     bit_init=True),
    "multiqa_550": Variant("tiny", 550, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224),
    "multiqa_bits_lr4e-3_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True),
    "multiqa_lr4e-3_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224),
    "iw0.25_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                          image_weight=0.25),
    "iw0.1_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                         image_weight=0.1),
    "iw0.25_lr6e-3_550": Variant("tiny", 550, 6e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                 image_weight=0.25),
    "iw0.25_t2i2_550": Variant("tiny", 550, 4e-3, {**MULTI_QA_MIX, "t2i": 2.0}, chat_turns=5, max_length=224,
                               bit_init=True, image_weight=0.25),
    "iw0.5_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                         image_weight=0.5),
    "iw0.25_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                image_weight=0.25, pos2d=True),
    "iw0.25_pos2d_bf16_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                     image_weight=0.25, pos2d=True, cpu_bf16=True),
    # the same wall time as iw0.25_pos2d_550 when bf16 steps are 1.2x faster (AMX CPUs)
    "iw0.25_pos2d_bf16_660": Variant("tiny", 660, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                     image_weight=0.25, pos2d=True, cpu_bf16=True),
    "g1_iw0.5_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                  image_weight=0.5, pos2d=True, one_group=True),
    # depth at equal wall time: 6 layers of 128 (380 steps ~ 550 of 4 layers), 6 layers of 96
    "deep6_iw0.25_pos2d_380": Variant("tiny", 380, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                      image_weight=0.25, pos2d=True, overrides={"num_hidden_layers": 6}),
    "deep6w96_iw0.25_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                         bit_init=True, image_weight=0.25, pos2d=True,
                                         overrides={"num_hidden_layers": 6, "hidden_size": 96,
                                                    "intermediate_size": 384}),
    "ctximg0.25_iw0.25_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                           bit_init=True, image_weight=0.25, pos2d=True, prompt_image_weight=0.25),
    "ctximg0.05_iw0.25_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                           bit_init=True, image_weight=0.25, pos2d=True, prompt_image_weight=0.05),
    # does text-to-image follow captions more with more text-to-image signal? (t2i_text_gain_per_image)
    "iw1_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                             image_weight=1.0, pos2d=True),
    "iw0.25_t2i8_pos2d_550": Variant("tiny", 550, 4e-3, {**MULTI_QA_MIX, "t2i": 8.0}, chat_turns=5, max_length=224,
                                     bit_init=True, image_weight=0.25, pos2d=True),
    "iw0.25_pos2d_lr6e-3_550": Variant("tiny", 550, 6e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                       image_weight=0.25, pos2d=True),
    "iw0.25_pos2d_lr8e-3_550": Variant("tiny", 550, 8e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                       image_weight=0.25, pos2d=True),
    "iw0.25_pos2d_lr5e-3_550": Variant("tiny", 550, 5e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                       image_weight=0.25, pos2d=True),
    # more questions per image: 3 rounds of the QA builders, 10-question conversations
    "qa3_chat10_iw0.25_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=10, max_length=320,
                                           bit_init=True, image_weight=0.25, pos2d=True, qa_rounds=3),
    "qa3_chat5_iw0.25_pos2d_550": Variant("tiny", 550, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                          bit_init=True, image_weight=0.25, pos2d=True, qa_rounds=3),
    # logits at labelled positions only, with two image ids per patch (the demo) or one (G=1)
    "hl_iw0.25_pos2d_900": Variant("tiny", 900, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                   image_weight=0.25, pos2d=True, hidden_loss=True),
    "hl_g1_iw0.5_pos2d_900": Variant("tiny", 900, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=160, bit_init=True,
                                     image_weight=0.5, pos2d=True, one_group=True, hidden_loss=True),
    # the long curve: the demo's configuration, and 6 layers, for 3,000 steps (how far does VQA go?)
    "hl_iw0.25_pos2d_3000": Variant("tiny", 3000, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                    image_weight=0.25, pos2d=True, hidden_loss=True),
    "hl_deep6_iw0.25_pos2d_3000": Variant("tiny", 3000, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                          bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                                          overrides={"num_hidden_layers": 6}),
    # session 13, on the lent GPU: the demo's configuration for 12,000 steps (16x the CPU demo's),
    # at its lr and at 1e-3, and with 6 layers: does VQA pass 80% with enough steps?
    "hl_iw0.25_pos2d_12k": Variant("tiny", 12000, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                   image_weight=0.25, pos2d=True, hidden_loss=True),
    "hl_iw0.25_pos2d_lr1e-3_12k": Variant("tiny", 12000, 1e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                          bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True),
    "hl_deep6_iw0.25_pos2d_12k": Variant("tiny", 12000, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                         bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                                         overrides={"num_hidden_layers": 6}),
    # yes/no questions alone (VQA sequences only): can the model learn them at all?
    "yesno_only_600": Variant("tiny", 600, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                              image_weight=0.25, pos2d=True, hidden_loss=True, qa_types=("yesno",)),
    "yesno_only_1200": Variant("tiny", 1200, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                               image_weight=0.25, pos2d=True, hidden_loss=True, qa_types=("yesno",)),
    # yes/no alone at lower learning rates (session 10): at 4e-3 the model never learns yes/no
    # (AUC of its yes-no margin ~0.5 even after 3,000 steps of the demo's mixture)
    "yesno_only_lr1e-3_600": Variant("tiny", 600, 1e-3, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                                     image_weight=0.25, pos2d=True, hidden_loss=True, qa_types=("yesno",)),
    "yesno_only_lr3e-4_600": Variant("tiny", 600, 3e-4, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                                     image_weight=0.25, pos2d=True, hidden_loss=True, qa_types=("yesno",)),
    # session 11: input and output embeddings tied (as Llama-3.2-1B), so the direction a colour
    # question's answer is read out along is the question word's own input embedding: does the
    # yes/no equality test ("is the object ... red?") then get learned from image ids?
    "tied_iw0.25_pos2d_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                     image_weight=0.25, pos2d=True, hidden_loss=True,
                                     overrides={"tie_word_embeddings": True}),
    "tied_iw0.25_pos2d_lr1e-3_600": Variant("tiny", 600, 1e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                            bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                                            overrides={"tie_word_embeddings": True}),
    # session 11: yes/no alone for 3,000 steps at lr 1e-3, beside bench/scene_qa_text.py --qa-types yesno
    # (the same questions with the scene as text): is the equality test slow to learn from the
    # image ids as well, or not learnable from them at all?
    "yesno_only_lr1e-3_3000": Variant("tiny", 3000, 1e-3, {"vqa": 1.0}, chat_turns=5, max_length=224,
                                      bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                                      qa_types=("yesno",)),
    # session 10: a text-only diagnostic (the scene as its long caption, then the question) showed
    # the same failure to find the named object, and lr 1e-3 learning it faster than 4e-3 at 1,500
    # steps: the demo's configuration and question-first at lr 1e-3
    "hl_iw0.25_pos2d_lr1e-3_600": Variant("tiny", 600, 1e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                          bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True),
    "textfirst_lr1e-3_600": Variant("tiny", 600, 1e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                    image_weight=0.25, pos2d=True, hidden_loss=True, text_first=True),
    # the demo's configuration for 600 steps, image first (as the demo) and question first
    "hl_iw0.25_pos2d_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                   image_weight=0.25, pos2d=True, hidden_loss=True),
    "textfirst_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                             image_weight=0.25, pos2d=True, hidden_loss=True, text_first=True),
    # does the mixture starve binding? understanding sequences only; and 8 heads of 16 dims
    "understand_only_600": Variant("tiny", 600, 4e-3, {"vqa": 1.0, "chat": 6.0}, chat_turns=5, max_length=224,
                                   bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True),
    "heads8_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                          image_weight=0.25, pos2d=True, hidden_loss=True,
                          overrides={"num_attention_heads": 8, "num_key_value_heads": 8}),
    # more captions (their long forms list every object with its place), and a one-object start
    "captions3_600": Variant("tiny", 600, 4e-3, {"vqa": 1.0, "caption": 3.0, "chat": 6.0, "t2i": 4.0, "text": 0.5},
                             chat_turns=5, max_length=224, bit_init=True, image_weight=0.25, pos2d=True,
                             hidden_loss=True),
    "one_object_first200_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                       image_weight=0.25, pos2d=True, hidden_loss=True, single_object_steps=200),
    # understanding-only training learned less (image modelling helps reading): the prompt's image
    # ids as targets too, at a small weight, against hl_iw0.25_pos2d_600
    "ctximg0.05_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                              image_weight=0.25, pos2d=True, hidden_loss=True, prompt_image_weight=0.05),
    "ctximg0.1_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                             image_weight=0.25, pos2d=True, hidden_loss=True, prompt_image_weight=0.1),
    # session 16: Muon on the decoder layers' matrices (AdamW for embeddings, head, norms)
    "muon_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                        image_weight=0.25, pos2d=True, hidden_loss=True, muon=True),
    # Session 19, codes of a tokenizer whose patch is a whole grid cell (36 px images, patch 12: 9
    # patches, one object each): steps are ~2.4x cheaper, so equal wall time is ~2.4x the steps.
    # Do the two 6-bit ids of a patch (an object's attributes split across an XOR-like pair) or
    # one 12-bit id per patch (one embedding row per cell content) read better?
    "muon_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE),
    "muon_onegroup_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, one_group=True),
    # with one object per patch, a user turn's text before its image lets each cell's id attend to
    # the question ("am I the object it names?"); at patch 4 (session 9) this did not help
    "muon_textfirst_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, text_first=True),
    # the same two for up to 6,000 steps (the lent GPU: how far does each go with more steps?)
    "muon_long": Variant("tiny", 6000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE),
    "muon_onegroup_long": Variant("tiny", 6000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, one_group=True),
    # session 20: the cell codes' sequences are ~110 ids, so a step is mostly overhead at hidden
    # 128; do a wider, deeper or more-headed decoder learn the named lookups in fewer steps, and
    # does that pay at equal wall time?
    "muon_w256_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE,
                              overrides={"hidden_size": 256, "intermediate_size": 1024,
                                         "num_attention_heads": 8, "num_key_value_heads": 8}),
    "muon_w192_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE,
                              overrides={"hidden_size": 192, "intermediate_size": 768,
                                         "num_attention_heads": 6, "num_key_value_heads": 6}),
    "muon_d6_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, overrides={"num_hidden_layers": 6}),
    "muon_h8_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE,
                            overrides={"num_attention_heads": 8, "num_key_value_heads": 8}),
    # is the named lookup learnable at all by this decoder when it is the only task? (colour
    # questions alone, one per image: most name one object among several)
    "colour_only_muon_1000": Variant("tiny", 1000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",)),
    "colour_only_adamw_1000": Variant("tiny", 1000, 2e-3, {"vqa": 1.0}, **{**MUON_RECIPE, "muon": False},
                                      qa_types=("colour",)),
    "colour_only_muon_wd0_1000": Variant("tiny", 1000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",),
                                         weight_decay=0.0),
    "colour_only_muon_3000": Variant("tiny", 3000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",)),
    "colour_only_muon_qk4_1000": Variant("tiny", 1000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",),
                                         qk_init_scale=4.0),
    # the lookup by place alone: every image id carries its row and column embedding, so the
    # key is there from the first step; is this one learned?
    "colour_place_only_muon_1000": Variant("tiny", 1000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",),
                                           question_prefix=PLACE_COLOUR_QUESTION),
    "colour_place_only_muon_qk4_1000": Variant("tiny", 1000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",),
                                               question_prefix=PLACE_COLOUR_QUESTION, qk_init_scale=4.0),
    "colour_place_only_muon_3000": Variant("tiny", 3000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",),
                                           question_prefix=PLACE_COLOUR_QUESTION),
    # one 12-bit id per patch: a key can name the patch's shape and size from its own position
    # (with two 6-bit ids a layer must merge them first); with the 4x start, are lookups by
    # attributes then learned like the lookup by place?
    "colour_only_onegroup_qk4_1000": Variant("tiny", 1000, 4e-3, {"vqa": 1.0}, **MUON_RECIPE, qa_types=("colour",),
                                             one_group=True, qk_init_scale=4.0),
    # query/key weights start 2, 4 or 8 times larger (UnifiedModelConfig.attention_init_scale):
    # does the named lookup start sooner when attention logits respond faster?
    "muon_qk4_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, qk_init_scale=4.0),
    # session 22: the same two at 3,000 steps (about 4x what the demo trains on a 2.0 GHz Skylake-SP
    # CPU without AMX): does VQA keep rising on the cell codes, and does the 4x start still lead?
    "muon_3000": Variant("tiny", 3000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE),
    "muon_qk4_3000": Variant("tiny", 3000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, qk_init_scale=4.0),
    # session 22: two "What is <place>?" questions per chat, against muon_1000
    "muon_place2_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, place_questions=2),
    "muon_qk8_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, qk_init_scale=8.0),
    "muon_qk2_1000": Variant("tiny", 1000, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, qk_init_scale=2.0),
    # session 21: several-object chats carry 5 extra fresh lookup questions (against muon_600)
    "muon_lookup5_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, **MUON_RECIPE, lookup_questions=5),
    "muon_lr2e-3_600": Variant("tiny", 600, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                               image_weight=0.25, pos2d=True, hidden_loss=True, muon=True),
    "muon_lr8e-3_600": Variant("tiny", 600, 8e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                               image_weight=0.25, pos2d=True, hidden_loss=True, muon=True),
    "muon_b16_1200": Variant("tiny", 1200, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, batch=16,
                             bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True, muon=True),
    # does Muon get yes/no off its constant answer? (AdamW: constant for 3,000 steps, session 11)
    "yesno_only_muon_1500": Variant("tiny", 1500, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                                    image_weight=0.25, pos2d=True, hidden_loss=True, qa_types=("yesno",), muon=True),
    "yesno_only_muon_lr1e-3_1500": Variant("tiny", 1500, 1e-3, {"vqa": 1.0}, chat_turns=5, max_length=224,
                                           bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                                           qa_types=("yesno",), muon=True),
    # session 17: questions labelled too (QuestionLabelBuilder), yes/no alone and the demo's mixture
    "yesno_only_muon_qlabel_600": Variant("tiny", 600, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224,
                                          bit_init=True, image_weight=0.25, pos2d=True, hidden_loss=True,
                                          qa_types=("yesno",), muon=True, question_labels=True),
    "muon_qlabel_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                               image_weight=0.25, pos2d=True, hidden_loss=True, muon=True, question_labels=True),
    # session 17: yes/no after a colour question about the same object, in half the chats: the
    # answer is then a match of two text words (learnable, bench/scene_qa_text.py), which may
    # route the asked colour to the answer position, so that reading it from the image pays off
    "muon_yn_scaffold_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                    image_weight=0.25, pos2d=True, hidden_loss=True, muon=True, yesno_scaffold=0.5),
    "muon_yn_scaffold_1500": Variant("tiny", 1500, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                     image_weight=0.25, pos2d=True, hidden_loss=True, muon=True, yesno_scaffold=0.5),
    # session 18: bits map + per-id random rows (half the variance each), and pure random rows
    "muon_bitrand0.5_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True,
                                   image_weight=0.25, pos2d=True, hidden_loss=True, muon=True, bit_random=0.5),
    # perception alone: shape questions on one-object images (no object to find), by init
    "shape1obj_bits_300": Variant("tiny", 300, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                                  image_weight=0.25, pos2d=True, hidden_loss=True, muon=True, qa_types=("shape",),
                                  single_object_steps=10**9),
    "shape1obj_default_300": Variant("tiny", 300, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224,
                                     image_weight=0.25, pos2d=True, hidden_loss=True, muon=True, qa_types=("shape",),
                                     single_object_steps=10**9),
    "shape1obj_bitrand0.5_300": Variant("tiny", 300, 4e-3, {"vqa": 1.0}, chat_turns=5, max_length=224, bit_init=True,
                                        image_weight=0.25, pos2d=True, hidden_loss=True, muon=True,
                                        qa_types=("shape",), single_object_steps=10**9, bit_random=0.5),
    "muon_default_init_600": Variant("tiny", 600, 4e-3, MULTI_QA_MIX, chat_turns=5, max_length=224,
                                     image_weight=0.25, pos2d=True, hidden_loss=True, muon=True),
    "multiqa_bits_550": Variant("tiny", 550, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True),
    "multiqa_bits_750": Variant("tiny", 750, 2e-3, MULTI_QA_MIX, chat_turns=5, max_length=224, bit_init=True),
}
