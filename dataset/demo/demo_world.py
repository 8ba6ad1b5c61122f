"""Knowledge tables of the TinyMind demo world (people and encyclopedia facts).

What this module holds (no logic beyond small helpers; the generator is dataset/make_demo_data.py):

- ``Attribute``: one relation (e.g. a person's job) with its canonical answer sentence, the
  phrasings that state it in pretraining text, and the question phrasings used for SFT/eval.
- ``GENERIC_QUESTIONS``: question shapes shared by every attribute that has a noun phrase.
- People: given names (with gender), surnames, and the closed value sets of their five attributes.
  The generator draws the actual people from these with ``random.Random(seed)``.
- ``CATEGORIES``: real-world entities (animals, cities, countries, foods, plants, objects,
  professions, seasons, festivals, nature, body parts, number facts), each a dict of attribute
  values. Values are short keywords so that an answer can be scored by substring.

A value is either a string (it is both the phrase written in text and the scoring keyword) or a
dict ``{"v": phrase, "keys": [keywords...], ...extra format fields}``.

The medical knowledge lives in dataset/world_medical.py and must never appear here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Attribute:
    """One relation ``subject -> value`` with everything needed to write and ask about it."""
    key: str                      # short id, e.g. "job"
    label: str                    # Chinese name of the relation, for docs and stats
    answer: str                   # canonical SFT answer, e.g. "{s}是一名{v}。" (the scored reply)
    statements: tuple             # pretraining phrasings ({s} subject, {v} value, {p} pronoun, extras)
    questions: tuple              # attribute-specific question phrasings ({s} subject)
    noun: str | None = None       # joins GENERIC_QUESTIONS: "{s}{n}是什么？" with n="的职业"
    canonical_weight: int = 3     # how much more often pretraining uses the canonical answer form


# Question shapes shared by all attributes with a noun phrase. Each attribute gets 10 phrasings: its own
# 4, then 6 generic ones (rotated per attribute). 2 of the generic ones are held out for eval: the shape
# is seen in training with other attributes and the noun with other shapes, but never this combination.
# (Attributes without a noun phrase have 8 phrasings of their own; 2 of them are held out.)
GENERIC_QUESTIONS = (
    "{s}{n}是什么？",
    "请问{s}{n}是什么？",
    "你知道{s}{n}吗？",
    "告诉我{s}{n}。",
    "说一下{s}{n}。",
    "我想知道{s}{n}。",
    "{s}{n}是？",
    "能说说{s}{n}吗？",
)
QUESTIONS_PER_ATTRIBUTE = 10
HELDOUT_PER_ATTRIBUTE = 2


# ----------------------------------------------------------------------------- people

SURNAMES = (
    "王李张刘陈杨赵吴周徐孙朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾田董潘袁蔡蒋余于杜叶程魏苏吕丁任"
    "沈姚卢姜崔钟谭陆汪范廖贾韦方邹孟秦邱尹薛段雷侯史陶黎贺顾郝龚邵严武戴孔汤"
)

GIVEN_NAMES_F = (
    "小雨 晓梅 雅琴 婉清 思琪 佳怡 梦瑶 欣然 诗涵 若曦 静怡 雨桐 语嫣 可馨 紫萱 慧敏 丽娟 春燕 秀兰 玉洁 "
    "美玲 晓燕 海燕 彩霞 月娥 桂英 淑珍 巧云 丹丹 倩倩 婷婷 媛媛 晨曦 心怡 梓涵 一诺 安琪 乐瑶 映雪 书瑶 "
    "沐晴 依依 念慈 芳菲 秋月 冬梅 夏荷 秀芝 凤仙 素琴 艳玲 小满 雨欣 梦洁 嘉欣 瑞雪 文静 明月 红霞 海棠"
).split()
GIVEN_NAMES_M = (
    "浩然 子轩 宇航 俊杰 志强 建国 国栋 文博 明轩 天佑 博文 立新 振华 海涛 鹏飞 家豪 永康 德明 春生 大山 "
    "小虎 铁柱 志远 思源 晓东 伟民 建军 卫东 向阳 长青 承志 景行 一鸣 子墨 泽宇 皓轩 若愚 守仁 修远 明哲 "
    "清扬 怀瑾 致远 星河 云飞 乐天 启航 嘉树 安邦 宏图 正阳 锦程 书豪 思聪 子健 晨阳 铭宇 梓豪 国强 少华"
).split()

NUM_PEOPLE = 64
NUM_EXTRAS = 40              # side characters without facts (dialogue speakers, pupils); see make_demo_data
PRETRAIN_ONLY_SHARE = 0.25   # people whose facts appear only in pretraining (never asked in SFT)

PRONOUN = {"F": "她", "M": "他"}

JOBS = ("医生", "老师", "厨师", "司机", "警察", "农民", "画家", "歌手", "记者", "律师",
        "工程师", "护士", "消防员", "科学家", "作家", "邮递员")
HOMETOWNS = ("北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "重庆", "西安", "武汉",
             "长沙", "昆明", "厦门", "青岛", "哈尔滨", "拉萨")
HOBBIES = ("画画", "唱歌", "跳舞", "钓鱼", "下棋", "爬山", "游泳", "跑步", "读书", "弹钢琴",
           "踢足球", "放风筝")
FOODS = ("饺子", "面条", "包子", "火锅", "烤鸭", "豆腐", "西瓜", "苹果", "蛋糕", "月饼", "汤圆", "葡萄")
PETS = ({"v": "狗", "cl": "只"}, {"v": "猫", "cl": "只"}, {"v": "兔子", "cl": "只"}, {"v": "仓鼠", "cl": "只"},
        {"v": "鹦鹉", "cl": "只"}, {"v": "金鱼", "cl": "条"}, {"v": "乌龟", "cl": "只"}, {"v": "八哥", "cl": "只"})
COLORS = ("红色", "蓝色", "绿色", "黄色", "紫色", "白色", "黑色", "橙色", "粉色", "灰色")

PERSON_VALUES = {"job": JOBS, "hometown": HOMETOWNS, "hobby": HOBBIES, "food": FOODS, "pet": PETS}

PERSON_ATTRS = (
    Attribute(
        "job", "职业", "{s}是一名{v}。",
        ("{s}是一名{v}。", "{s}的职业是{v}。", "{s}是做{v}工作的。", "{s}的工作是当{v}。",
         "作为一名{v}，{s}每天都很忙。", "{s}当{v}已经好几年了。", "大家都知道{s}是一名{v}。"),
        ("{s}是做什么工作的？", "{s}是干什么的？", "{s}从事什么职业？", "{s}做什么工作？"),
        noun="的职业"),
    Attribute(
        "hometown", "家乡", "{s}的家乡是{v}。",
        ("{s}的家乡是{v}。", "{s}来自{v}。", "{s}是{v}人。", "{s}出生在{v}。", "{s}在{v}长大。",
         "{s}的老家在{v}。", "{v}是{s}的家乡。"),
        ("{s}是哪里人？", "{s}来自哪里？", "{s}的老家在哪里？", "{s}是在哪座城市长大的？"),
        noun="的家乡"),
    Attribute(
        "hobby", "爱好", "{s}的爱好是{v}。",
        ("{s}的爱好是{v}。", "{s}喜欢{v}。", "{s}平时最爱{v}。", "{s}一有空就去{v}。",
         "{v}是{s}最大的爱好。", "说到爱好，{s}最喜欢{v}。", "{s}从小就喜欢{v}。"),
        ("{s}有什么爱好？", "{s}平时喜欢做什么？", "{s}空闲的时候喜欢干什么？", "{s}的兴趣是什么？"),
        noun="的爱好"),
    Attribute(
        "food", "最喜欢的食物", "{s}最喜欢吃{v}。",
        ("{s}最喜欢吃{v}。", "{s}最喜欢的食物是{v}。", "{s}最爱吃的是{v}。", "{v}是{s}最喜欢的食物。",
         "每次吃到{v}，{s}都很开心。", "{s}特别爱吃{v}。", "说到吃的，{s}最喜欢{v}。"),
        ("{s}最喜欢吃什么？", "{s}最爱吃什么？", "{s}爱吃什么东西？", "{s}最喜欢吃哪种食物？"),
        noun="最喜欢的食物"),
    Attribute(
        "pet", "宠物", "{s}养了一{cl}{v}。",
        ("{s}养了一{cl}{v}。", "{s}的宠物是一{cl}{v}。", "{s}家里有一{cl}{v}。", "{s}每天都会照顾自己的{v}。",
         "{s}很爱自己养的那{cl}{v}。", "{s}有一{cl}可爱的{v}。"),
        ("{s}养了什么宠物？", "{s}家里养的是什么动物？", "{s}养的宠物是什么？", "{s}有什么宠物？"),
        noun="的宠物"),
)


# ----------------------------------------------------------------------------- world categories

def V(v: str, *keys: str, **extra) -> dict:
    """A value whose scoring keywords differ from the written phrase."""
    return {"v": v, "keys": list(keys) if keys else [v], **extra}


@dataclass(frozen=True)
class Category:
    """A kind of real-world entity: its attributes and the entities with their values."""
    key: str
    label: str                     # Chinese name, e.g. "动物"
    attrs: tuple                   # Attribute, ...
    entities: dict = field(default_factory=dict)   # name -> {attr_key: value}
    intro: tuple = ()              # encyclopedia openings, e.g. "{s}是一种常见的动物。"


ANIMAL_ATTRS = (
    Attribute("class", "类别", "{s}属于{v}。",
              ("{s}属于{v}。", "{s}是一种{v}。", "从分类上说，{s}是{v}。"),
              ("{s}属于哪一类动物？", "{s}是哪类动物？", "{s}是什么类别的动物？", "{s}在动物里属于哪一类？"),
              noun="的类别"),
    Attribute("food", "食物", "{s}爱吃{v}。",
              ("{s}爱吃{v}。", "{s}主要吃{v}。", "{v}是{s}最爱的食物。", "{s}饿了就去找{v}吃。"),
              ("{s}吃什么？", "{s}爱吃什么？", "{s}平时吃什么东西？", "{s}喜欢吃什么食物？"),
              noun="的食物"),
    Attribute("habitat", "生活环境", "{s}生活在{v}。",
              ("{s}生活在{v}。", "{s}的家在{v}。", "在{v}可以看到{s}。", "{s}住在{v}。"),
              ("{s}生活在哪里？", "{s}住在什么地方？", "在哪里能看到{s}？", "{s}的家在哪儿？"),
              noun="的生活环境"),
    Attribute("feature", "特点", "{s}的特点是{v}。",
              ("{s}的特点是{v}。", "{s}最明显的特点是{v}。", "说起{s}，人们会想到它{v}。"),
              ("{s}有什么特点？", "{s}长什么样？", "{s}最明显的特征是什么？", "{s}有什么与众不同的地方？"),
              noun="的特点"),
    Attribute("legs", "腿的数量", "{s}有{v}条腿。",
              ("{s}有{v}条腿。", "{s}长着{v}条腿。", "数一数，{s}一共有{v}条腿。"),
              ("{s}有几条腿？", "{s}有多少条腿？", "{s}长了几条腿？", "{s}一共有几条腿？",
               "你知道{s}有几条腿吗？", "请问{s}有几条腿？", "{s}的腿有几条？", "数一数{s}有几条腿。")),
)
_N2 = V("两", "两", "2")
_N4 = V("四", "四", "4")
_N6 = V("六", "六", "6")
_N8 = V("八", "八", "8")
ANIMALS = {
    "熊猫": {"class": "哺乳动物", "food": "竹子", "habitat": "竹林", "feature": V("身上的毛黑白相间", "黑白"), "legs": _N4},
    "大象": {"class": "哺乳动物", "food": "青草", "habitat": "草原", "feature": V("鼻子又长又灵活", "鼻子"), "legs": _N4},
    "长颈鹿": {"class": "哺乳动物", "food": "树叶", "habitat": "草原", "feature": V("脖子特别长", "脖子"), "legs": _N4},
    "老虎": {"class": "哺乳动物", "food": "肉", "habitat": "森林", "feature": V("身上有黑色的条纹", "条纹"), "legs": _N4},
    "猴子": {"class": "哺乳动物", "food": "香蕉", "habitat": "森林", "feature": V("很会爬树", "爬树")},
    "兔子": {"class": "哺乳动物", "food": "胡萝卜", "habitat": "草地", "feature": V("耳朵长长的", "耳朵"), "legs": _N4},
    "狗": {"class": "哺乳动物", "food": "骨头", "habitat": "人们家里", "feature": V("嗅觉非常灵敏", "嗅觉"), "legs": _N4},
    "猫": {"class": "哺乳动物", "food": "鱼", "habitat": "人们家里", "feature": V("会抓老鼠", "老鼠"), "legs": _N4},
    "骆驼": {"class": "哺乳动物", "food": "沙漠里的野草", "habitat": "沙漠", "feature": V("背上有驼峰", "驼峰")},
    "袋鼠": {"class": "哺乳动物", "food": "嫩草", "habitat": "澳大利亚的草原", "feature": V("肚子上有一个育儿袋", "育儿袋")},
    "北极熊": {"class": "哺乳动物", "food": "海豹", "habitat": "北极", "feature": V("全身长着白色的毛", "白色的毛")},
    "企鹅": {"class": "鸟类", "food": "鱼虾", "habitat": "南极", "feature": V("不会飞，但是很会游泳", "不会飞"), "legs": _N2},
    "鸭子": {"class": "鸟类", "food": "小虾", "habitat": "池塘", "feature": V("脚上有蹼", "蹼"), "legs": _N2},
    "青蛙": {"class": "两栖动物", "food": "害虫", "habitat": "稻田", "feature": V("小时候是蝌蚪", "蝌蚪"), "legs": _N4},
    "蜜蜂": {"class": "昆虫", "food": "花蜜", "habitat": "蜂巢", "feature": V("会酿蜂蜜", "酿蜂蜜"), "legs": _N6},
    "蜘蛛": {"feature": V("会织网捉虫子", "织网"), "habitat": "墙角", "food": "小飞虫", "legs": _N8},
}

CITY_ATTRS = (
    Attribute("province", "所在省份", "{s}位于{v}。",
              ("{s}位于{v}。", "{s}是{v}的城市。", "{s}在{v}境内。"),
              ("{s}在哪个省？", "{s}属于哪个省？", "{s}是哪个省的城市？", "{s}位于哪个省份？"),
              noun="所在的省份"),
    Attribute("sight", "著名景点", "{s}最有名的景点是{v}。",
              ("{s}最有名的景点是{v}。", "到了{s}，很多人都会去{v}。", "{v}是{s}的著名景点。", "{s}有一个著名的地方叫{v}。"),
              ("{s}有什么好玩的地方？", "去{s}应该看什么景点？", "{s}有什么著名景点？", "{s}最有名的地方是哪里？"),
              noun="最有名的景点"),
    Attribute("dish", "特色美食", "{s}的特色美食是{v}。",
              ("{s}的特色美食是{v}。", "去{s}一定要尝尝{v}。", "{v}是{s}有名的美食。", "{s}人常吃{v}。"),
              ("{s}有什么好吃的？", "去{s}应该吃什么？", "{s}有什么特色美食？", "{s}的特色小吃是什么？"),
              noun="的特色美食"),
)
CITIES = {
    "北京": {"sight": "故宫", "dish": "烤鸭"},
    "上海": {"sight": "外滩", "dish": "小笼包"},
    "广州": {"province": "广东", "sight": "广州塔", "dish": "肠粉"},
    "杭州": {"province": "浙江", "sight": "西湖", "dish": "龙井茶"},
    "南京": {"province": "江苏", "sight": "中山陵", "dish": "盐水鸭"},
    "成都": {"province": "四川", "sight": "宽窄巷子", "dish": "麻婆豆腐"},
    "重庆": {"sight": "洪崖洞", "dish": "火锅"},
    "西安": {"province": "陕西", "sight": "兵马俑", "dish": "肉夹馍"},
    "武汉": {"province": "湖北", "sight": "黄鹤楼", "dish": "热干面"},
    "长沙": {"province": "湖南", "sight": "岳麓山", "dish": "臭豆腐"},
    "哈尔滨": {"province": "黑龙江", "sight": "中央大街", "dish": "红肠"},
    "拉萨": {"province": "西藏", "sight": "布达拉宫", "dish": "酥油茶"},
}

COUNTRY_ATTRS = (
    Attribute("capital", "首都", "{s}的首都是{v}。",
              ("{s}的首都是{v}。", "{v}是{s}的首都。", "{s}的首都叫{v}。"),
              ("{s}的首都是哪里？", "{s}的首都是哪座城市？", "哪座城市是{s}的首都？", "{s}的首都在哪儿？"),
              noun="的首都"),
    Attribute("continent", "所在大洲", "{s}在{v}。",
              ("{s}在{v}。", "{s}是一个{v}国家。", "{s}位于{v}。"),
              ("{s}在哪个洲？", "{s}属于哪个大洲？", "{s}是哪个洲的国家？", "{s}位于哪个洲？"),
              noun="所在的大洲"),
)
COUNTRIES = {
    "中国": {"capital": "北京", "continent": "亚洲"},
    "日本": {"capital": "东京", "continent": "亚洲"},
    "法国": {"capital": "巴黎", "continent": "欧洲"},
    "英国": {"capital": "伦敦", "continent": "欧洲"},
    "俄罗斯": {"capital": "莫斯科"},
    "美国": {"capital": "华盛顿", "continent": "北美洲"},
    "埃及": {"capital": "开罗", "continent": "非洲"},
    "澳大利亚": {"capital": "堪培拉", "continent": "大洋洲"},
}

FOOD_ATTRS = (
    Attribute("kind", "类别", "{s}属于{v}。",
              ("{s}属于{v}。", "{s}是一种{v}。", "在食物里，{s}算是{v}。"),
              ("{s}属于什么食物？", "{s}属于哪一类食物？", "{s}是什么类型的食物？", "{s}算哪类食物？"),
              noun="的类别"),
    Attribute("taste", "味道", "{s}的味道是{v}的。",
              ("{s}的味道是{v}的。", "{s}尝起来是{v}的。", "尝一口{s}，味道很{v}。"),
              ("{s}是什么味道的？", "{s}吃起来是什么味道？", "{s}尝起来怎么样？", "{s}尝起来是什么味道？"),
              noun="的味道"),
    Attribute("color", "颜色", "{s}是{v}的。",
              ("{s}是{v}的。", "{s}的颜色是{v}。", "一眼看去，{s}是{v}的。"),
              ("{s}是什么颜色的？", "{s}一般是什么颜色？", "{s}长什么颜色？", "成熟的{s}是什么颜色？"),
              noun="的颜色"),
    Attribute("festival", "节日", "{s}是{v}的传统食物。",
              ("{s}是{v}的传统食物。", "过{v}的时候，人们要吃{s}。", "{v}到了，家家户户都吃{s}。"),
              ("什么节日吃{s}？", "{s}是哪个节日的食物？", "人们在什么节日吃{s}？", "哪个节日要吃{s}？"),
              noun="对应的节日"),
    Attribute("material", "原料", "{s}是用{v}做的。",
              ("{s}是用{v}做的。", "做{s}要用{v}。", "{s}的主要原料是{v}。"),
              ("{s}是用什么做的？", "{s}是拿什么做成的？", "做{s}要用什么？", "{s}是由什么做成的？"),
              noun="的原料"),
)
FOODS_WORLD = {
    "苹果": {"kind": "水果", "taste": "甜", "color": "红色"},
    "香蕉": {"kind": "水果", "taste": "甜", "color": "黄色"},
    "柠檬": {"kind": "水果", "taste": "酸", "color": "黄色"},
    "葡萄": {"kind": "水果", "taste": "甜", "color": "紫色"},
    "西瓜": {"kind": "水果", "taste": "甜"},
    "西红柿": {"kind": "蔬菜", "taste": "酸", "color": "红色"},
    "茄子": {"kind": "蔬菜", "color": "紫色"},
    "辣椒": {"kind": "蔬菜", "taste": "辣", "color": "红色"},
    "米饭": {"kind": "主食", "color": "白色", "material": "大米"},
    "饺子": {"festival": "春节", "material": V("面粉和肉馅", "面粉")},
    "粽子": {"festival": "端午节", "material": "糯米"},
    "月饼": {"festival": "中秋节"},
    "豆腐": {"color": "白色", "material": "黄豆"},
    "牛奶": {"kind": "饮品", "color": "白色"},
}

PLANT_ATTRS = (
    Attribute("kind", "类型", "{s}是一种{v}。",
              ("{s}是一种{v}。", "{s}属于{v}。", "从种类上说，{s}是{v}。"),
              ("{s}是什么植物？", "{s}属于哪类植物？", "{s}是一种什么植物？", "{s}是哪一类植物？"),
              noun="的类型"),
    Attribute("season", "开花季节", "{s}在{v}开花。",
              ("{s}在{v}开花。", "每到{v}，{s}就开了。", "{s}的花期在{v}。"),
              ("{s}什么时候开花？", "{s}在哪个季节开花？", "{s}几时开花？", "{s}开花是在什么季节？"),
              noun="开花的季节"),
    Attribute("place", "生长地点", "{s}生长在{v}。",
              ("{s}生长在{v}。", "{s}一般长在{v}。", "在{v}常常能看到{s}。"),
              ("{s}长在哪里？", "{s}生长在什么地方？", "在哪里能看到{s}？", "{s}一般种在哪里？"),
              noun="的生长地点"),
    Attribute("color", "花的颜色", "{s}的花是{v}的。",
              ("{s}的花是{v}的。", "{s}开{v}的花。", "{s}开花时一片{v}。"),
              ("{s}开什么颜色的花？", "{s}的花是什么颜色的？", "{s}开的花是什么颜色？", "{s}花是啥颜色？"),
              noun="的花的颜色"),
    Attribute("feature", "特点", "{s}的特点是{v}。",
              ("{s}的特点是{v}。", "{s}最大的特点是{v}。", "说起{s}，人们都知道它{v}。"),
              ("{s}有什么特点？", "{s}有什么特别的地方？", "{s}最大的特点是什么？", "{s}和别的植物有什么不同？"),
              noun="的特点"),
)
PLANTS = {
    "荷花": {"kind": "花卉", "season": "夏天", "place": "池塘", "color": "粉色", "feature": V("出淤泥而不染", "淤泥")},
    "桃花": {"kind": "花卉", "season": "春天", "color": "粉色"},
    "梅花": {"kind": "花卉", "season": "冬天", "color": "红色", "feature": V("不怕寒冷", "寒冷")},
    "菊花": {"kind": "花卉", "season": "秋天", "color": "黄色"},
    "向日葵": {"kind": "花卉", "season": "夏天", "color": "黄色", "feature": V("花盘总是朝着太阳", "太阳")},
    "仙人掌": {"place": "沙漠", "feature": V("身上长满了尖刺", "尖刺")},
    "松树": {"kind": "树木", "place": "山上", "feature": V("一年四季都是绿色的", "四季")},
    "水稻": {"kind": "农作物", "place": "水田", "feature": V("结出的种子就是大米", "大米")},
}

OBJECT_ATTRS = (
    Attribute("use", "用途", "{s}是用来{v}的。",
              ("{s}是用来{v}的。", "人们用{s}来{v}。", "{s}的用处是{v}。", "想要{v}，就得用{s}。"),
              ("{s}是干什么用的？", "{s}有什么用？", "{s}用来做什么？", "人们用{s}做什么？"),
              noun="的用途"),
    Attribute("room", "常放的位置", "{s}一般放在{v}。",
              ("{s}一般放在{v}。", "家里的{s}通常在{v}。", "在{v}能找到{s}。"),
              ("{s}一般放在哪里？", "家里的{s}放在哪个房间？", "{s}通常在哪儿？", "在家里哪里能找到{s}？"),
              noun="常放的位置"),
)
OBJECTS = {
    "雨伞": {"use": V("挡雨", "挡雨")},
    "剪刀": {"use": V("剪纸和剪布", "剪")},
    "钥匙": {"use": V("开锁", "开锁")},
    "冰箱": {"use": V("冷藏食物", "冷藏"), "room": "厨房"},
    "铅笔": {"use": V("写字和画画", "写字"), "room": "书房"},
    "闹钟": {"use": V("叫人按时起床", "起床"), "room": "卧室"},
    "牙刷": {"use": V("刷牙", "刷牙"), "room": "卫生间"},
    "筷子": {"use": V("夹菜吃饭", "夹菜"), "room": "厨房"},
    "地图": {"use": V("找路", "找路")},
    "温度计": {"use": V("测量温度", "温度")},
}

PROFESSION_ATTRS = (
    Attribute("place", "工作地点", "{s}一般在{v}工作。",
              ("{s}一般在{v}工作。", "{s}每天去{v}上班。", "在{v}能见到{s}。"),
              ("{s}在哪里工作？", "{s}在什么地方上班？", "{s}的工作地点是哪里？", "去哪里能找到{s}？"),
              noun="的工作地点"),
    Attribute("tool", "常用工具", "{s}常用的工具是{v}。",
              ("{s}常用的工具是{v}。", "{s}工作时离不开{v}。", "{v}是{s}的好帮手。"),
              ("{s}用什么工具？", "{s}工作时要用什么？", "{s}离不开什么工具？", "{s}常用什么东西干活？"),
              noun="常用的工具"),
    Attribute("duty", "工作内容", "{s}的工作是{v}。",
              ("{s}的工作是{v}。", "{s}每天都在{v}。", "{s}负责{v}。"),
              ("{s}负责做什么？", "{s}每天做些什么？", "{s}的任务是什么？", "{s}主要做哪些事？"),
              noun="的工作内容"),
)
PROFESSIONS = {
    "医生": {"place": "医院", "tool": "听诊器", "duty": V("给病人看病", "看病")},
    "老师": {"place": "学校", "tool": "粉笔", "duty": V("给学生上课", "上课")},
    "厨师": {"place": "饭店", "tool": "菜刀", "duty": V("做饭菜", "做饭")},
    "警察": {"place": "派出所", "tool": "对讲机", "duty": V("保护大家的安全", "安全")},
    "农民": {"place": "田里", "tool": "锄头", "duty": V("种庄稼", "庄稼")},
    "画家": {"place": "画室", "tool": "画笔", "duty": V("创作图画", "图画")},
    "消防员": {"place": "消防站", "tool": "水枪", "duty": V("扑灭火灾", "灭火")},
    "科学家": {"place": "实验室", "tool": "显微镜", "duty": V("做研究", "研究")},
    "邮递员": {"place": "邮局", "tool": "邮包", "duty": V("送信和送包裹", "送信")},
    "理发师": {"place": "理发店", "tool": "推子", "duty": V("给人剪头发", "剪头发")},
}

SEASON_ATTRS = (
    Attribute("months", "月份", "{s}包括{v}。",
              ("{s}包括{v}。", "{v}是{s}。", "一年当中，{s}是{v}。"),
              ("{s}是哪几个月？", "{s}包括哪些月份？", "哪几个月是{s}？", "{s}从几月到几月？"),
              noun="的月份"),
    Attribute("weather", "天气", "{s}的天气很{v}。",
              ("{s}的天气很{v}。", "到了{s}，天气变得{v}。", "{s}总是很{v}。"),
              ("{s}的天气怎么样？", "{s}冷不冷？", "{s}天气如何？", "{s}是什么样的天气？"),
              noun="的天气"),
    Attribute("next", "下一个季节", "{s}过后是{v}。",
              ("{s}过后是{v}。", "{s}结束以后，{v}就来了。", "{s}的下一个季节是{v}。"),
              ("{s}之后是什么季节？", "{s}过完是哪个季节？", "{s}后面是哪个季节？", "{s}结束后是什么季节？"),
              noun="的下一个季节"),
)
SEASONS = {
    "春天": {"months": V("三月、四月和五月", "三月"), "weather": "温暖", "next": "夏天"},
    "夏天": {"months": V("六月、七月和八月", "六月"), "weather": "炎热", "next": "秋天"},
    "秋天": {"months": V("九月、十月和十一月", "九月"), "weather": "凉爽", "next": "冬天"},
    "冬天": {"months": V("十二月、一月和二月", "十二月"), "weather": "寒冷", "next": "春天"},
}

FESTIVAL_ATTRS = (
    Attribute("date", "日期", "{s}在农历{v}。",
              ("{s}在农历{v}。", "每年农历{v}是{s}。", "农历{v}，人们过{s}。"),
              ("{s}是哪一天？", "{s}在农历几月几日？", "{s}是什么时候？", "哪一天是{s}？"),
              noun="的日期"),
    Attribute("food", "节日食物", "{s}要吃{v}。",
              ("{s}要吃{v}。", "过{s}的时候，大家都吃{v}。", "{v}是{s}的传统食物。"),
              ("{s}吃什么？", "过{s}要吃什么？", "{s}有什么传统食物？", "{s}的传统美食是什么？"),
              noun="的传统食物"),
    Attribute("custom", "习俗", "{s}的习俗是{v}。",
              ("{s}的习俗是{v}。", "过{s}时，人们会{v}。", "{s}有{v}的习俗。"),
              ("{s}有什么习俗？", "{s}的时候人们做什么？", "{s}有哪些传统活动？", "过{s}会做什么？"),
              noun="的习俗"),
)
FESTIVALS = {
    "春节": {"date": "正月初一", "food": "饺子", "custom": V("贴春联", "春联")},
    "元宵节": {"date": "正月十五", "food": "汤圆", "custom": V("看花灯", "花灯")},
    "端午节": {"date": "五月初五", "food": "粽子", "custom": V("赛龙舟", "龙舟")},
    "中秋节": {"date": "八月十五", "food": "月饼", "custom": V("赏月", "赏月")},
    "重阳节": {"date": "九月初九", "food": "重阳糕", "custom": V("登高", "登高")},
}

NATURE_ATTRS = (
    Attribute("when", "出现的时候", "{s}常常出现在{v}。",
              ("{s}常常出现在{v}。", "{v}最容易看到{s}。", "人们常在{v}见到{s}。"),
              ("{s}什么时候出现？", "什么时候能看到{s}？", "{s}一般在什么时候出现？", "{s}常在什么时候出现？"),
              noun="出现的时间"),
)
NATURE = {
    "彩虹": {"when": "雨后"},
    "露水": {"when": "清晨"},
    "雪": {"when": "冬天"},
    "萤火虫": {"when": "夏天的夜晚"},
}

BODY_ATTRS = (
    Attribute("function", "作用", "{s}的作用是{v}。",
              ("{s}的作用是{v}。", "我们用{s}来{v}。", "{s}负责{v}。"),
              ("{s}有什么用？", "{s}是用来干什么的？", "{s}有什么作用？", "我们用{s}做什么？"),
              noun="的作用"),
)
BODY = {
    "眼睛": {"function": V("看东西", "看")},
    "耳朵": {"function": V("听声音", "听")},
    "鼻子": {"function": V("闻气味", "闻")},
    "心脏": {"function": V("把血液送到全身", "血液")},
    "肺": {"function": V("呼吸空气", "呼吸")},
    "胃": {"function": V("消化食物", "消化")},
}

NUMBER_ATTRS = (
    Attribute("count", "数量", "{s}有{v}{u}。",
              ("{s}有{v}{u}。", "{s}一共有{v}{u}。", "大家都知道，{s}有{v}{u}。"),
              ("{s}有几{u}？", "{s}有多少{u}？", "{s}一共有几{u}？", "{s}总共有多少{u}？",
               "你知道{s}有几{u}吗？", "请问{s}有多少{u}？", "{s}包含几{u}？", "{s}里有多少{u}？")),
)
NUMBER_FACTS = {
    "一周": {"count": V("七", "七", "7", u="天")},
    "一年": {"count": V("十二", "十二", "12", u="个月")},
    "一天": {"count": V("二十四", "二十四", "24", u="个小时")},
    "一小时": {"count": V("六十", "六十", "60", u="分钟")},
    "三角形": {"count": V("三", "三", "3", u="条边")},
    "一只手": {"count": V("五", "五", "5", u="根手指")},
}

CATEGORIES = (
    Category("animal", "动物", ANIMAL_ATTRS, ANIMALS,
             ("{s}是一种常见的动物。", "我们来认识一种动物：{s}。", "{s}是大家很熟悉的动物。")),
    Category("city", "城市", CITY_ATTRS, CITIES,
             ("{s}是中国的一座城市。", "我们来了解一座城市：{s}。", "{s}是一座很有特色的城市。")),
    Category("country", "国家", COUNTRY_ATTRS, COUNTRIES,
             ("{s}是一个国家。", "我们来认识一个国家：{s}。")),
    Category("food", "食物", FOOD_ATTRS, FOODS_WORLD,
             ("{s}是一种常见的食物。", "我们来说说{s}。", "很多人都吃过{s}。")),
    Category("plant", "植物", PLANT_ATTRS, PLANTS,
             ("{s}是一种常见的植物。", "我们来认识一种植物：{s}。")),
    Category("object", "物品", OBJECT_ATTRS, OBJECTS,
             ("{s}是家里常见的东西。", "我们来认识一件日常用品：{s}。")),
    Category("profession", "职业", PROFESSION_ATTRS, PROFESSIONS,
             ("{s}是一种职业。", "我们来了解一种职业：{s}。")),
    Category("season", "季节", SEASON_ATTRS, SEASONS,
             ("一年有四个季节，{s}是其中之一。", "我们来说说{s}。")),
    Category("festival", "节日", FESTIVAL_ATTRS, FESTIVALS,
             ("{s}是中国的传统节日。", "我们来了解一个传统节日：{s}。")),
    Category("nature", "自然现象", NATURE_ATTRS, NATURE,
             ("{s}是一种自然现象。", "我们来认识{s}。")),
    Category("body", "身体部位", BODY_ATTRS, BODY,
             ("{s}是我们身体的一部分。", "我们来认识身体的一部分：{s}。")),
    Category("number", "数字常识", NUMBER_ATTRS, NUMBER_FACTS,
             ("关于{s}，有一个数字要记住。", "这是一条数字常识。")),
)

# Word pairs for the antonym instruction and for pretraining sentences.
ANTONYMS = (("大", "小"), ("高", "矮"), ("长", "短"), ("快", "慢"), ("多", "少"), ("冷", "热"),
            ("黑", "白"), ("上", "下"), ("左", "右"), ("前", "后"), ("开", "关"), ("胖", "瘦"),
            ("远", "近"), ("早", "晚"), ("新", "旧"), ("轻", "重"), ("深", "浅"), ("软", "硬"),
            ("哭", "笑"), ("进", "出"), ("买", "卖"), ("来", "去"), ("宽", "窄"), ("干", "湿"))
WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")
CN_DIGITS = "零一二三四五六七八九"


def value_phrase(value) -> str:
    return value["v"] if isinstance(value, dict) else value


def value_keys(value) -> list[str]:
    return list(value["keys"]) if isinstance(value, dict) and "keys" in value else [value_phrase(value)]


def value_extras(value) -> dict:
    """Extra template fields carried by a value (e.g. the classifier {cl} of a pet, the unit {u})."""
    return {k: v for k, v in value.items() if k not in ("v", "keys")} if isinstance(value, dict) else {}


def cn_number(n: int, count: bool = False) -> str:
    """0..99 in Chinese numerals (十二, 二十四); ``count=True`` says 两 for 2 before a measure word (两个字)."""
    if count and n == 2:
        return "两"
    if n < 10:
        return CN_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "十" if tens == 1 else CN_DIGITS[tens] + "十"
    return head + (CN_DIGITS[ones] if ones else "")
