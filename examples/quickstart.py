"""Quickstart: steer SmolLM2-135M-Instruct with a sentiment vector, target-native and from the
Qwen2.5-Coder-0.5B-Instruct expert, through the Python API.

    python examples/quickstart.py            # after `expertsteer prepare` of both models

Prints each prompt's unsteered continuation, then the continuations steered by the target's
own vector (mean difference of its states) and by the expert's vector (the paper's RFM on the
expert's states, brought over by a token-level ridge map) towards positive and negative
sentiment, and saves the expert vector with its strength. A few minutes on a 2-core CPU,
most of it capturing the map's token pairs and generating.
"""

import itertools
import time

import expertsteer as es

POSITIVE = [
    "I absolutely loved this film, it was wonderful from start to finish.",
    "What a delightful day, everything went perfectly.",
    "The food was delicious and the staff were so friendly.",
    "This is the best book I have read in years, truly inspiring.",
    "I am thrilled with my new phone, it works beautifully.",
    "The concert was amazing and the crowd was full of joy.",
    "Our holiday was fantastic, we felt happy and relaxed.",
    "She gave a brilliant, heartwarming performance.",
    "The garden looks lovely in the warm spring sunshine.",
    "I feel grateful and cheerful after such a great evening.",
    "The service was excellent and I would gladly come back.",
    "It is a charming little town with wonderful people.",
    "This game is so much fun, I enjoyed every minute.",
    "The children laughed happily all afternoon.",
    "A superb meal, fresh, tasty and beautifully presented.",
    "I love how kind and helpful everyone was.",
]
NEGATIVE = [
    "I absolutely hated this film, it was awful from start to finish.",
    "What a miserable day, everything went wrong.",
    "The food was disgusting and the staff were so rude.",
    "This is the worst book I have read in years, truly boring.",
    "I am furious with my new phone, it breaks constantly.",
    "The concert was terrible and the crowd was angry.",
    "Our holiday was a disaster, we felt stressed and exhausted.",
    "She gave a dreadful, embarrassing performance.",
    "The garden looks dead and ugly in the cold grey rain.",
    "I feel bitter and gloomy after such a horrible evening.",
    "The service was appalling and I will never come back.",
    "It is a depressing little town with unfriendly people.",
    "This game is so tedious, I regretted every minute.",
    "The children cried miserably all afternoon.",
    "A nasty meal, stale, bland and carelessly thrown together.",
    "I hate how cold and unhelpful everyone was.",
]
# Generic texts for the expert -> target map: any plain text both models read.
SUBJECTS = ["The teacher", "My neighbour", "A small company", "The city council", "Our team"]
ACTIONS = ["opened a new office", "planned the budget", "wrote a short report", "fixed the roof"]
TIMES = ["on Monday morning.", "after a long meeting.", "before the winter."]
CORPUS = [" ".join(words) for words in itertools.product(SUBJECTS, ACTIONS, TIMES)]
PROMPTS = ["Tell me about your weekend.", "Describe the city you live in."]

started = time.perf_counter()
expert = es.load_model("qwen2.5-coder-0.5b-instruct")
target = es.load_model("smollm2-135m-instruct")
native = es.train_vector(target, POSITIVE, NEGATIVE)  # the target's own direction
mapping = es.fit_mapping(expert, target, CORPUS + POSITIVE + NEGATIVE)  # expert -> target
vector = es.train_expert_vector(expert, target, POSITIVE, NEGATIVE, mapping)  # ExpertSteer

steerings = {"unsteered": None, "target +": native, "expert +": vector, "expert -": -vector}
for name, steering in steerings.items():
    if steering is None:
        answers = target.generate(PROMPTS, max_new_tokens=30)
    else:
        with steering.apply(target.model, alpha=0.3):  # forward hooks on the plain model
            answers = target.generate(PROMPTS, max_new_tokens=30)
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        print(f"[{name}] {prompt}\n    {' '.join(answer.split())}")

vector.with_choice(alpha=0.3).save("quickstart_vector.safetensors")  # apply() needs no alpha
(fit,) = mapping.metadata["pair_maps"]
print(
    f"map: expert block {fit['expert_layer']} -> target block {fit['target_layer']}, held-out "
    f"R^2 {fit['heldout_r2']:.2f}; finished in {time.perf_counter() - started:.0f} s"
)
